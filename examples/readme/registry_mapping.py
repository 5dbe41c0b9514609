from patio import Registry

rpc = Registry(project="example")


def mul(a, b):
    return a * b


rpc["mul"] = mul
