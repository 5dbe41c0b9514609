from patio import Registry

rpc = Registry(project="example")


def pow(a, b):
    return a**b


def sub(a, b):
    return a - b


# Register with auto generated name
rpc.register(pow)
rpc.register(sub, "sub")
