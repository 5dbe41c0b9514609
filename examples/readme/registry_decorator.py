from patio import Registry

rpc = Registry(project="example")


# Will be registered with auto generated name
@rpc
def mul(a, b):
    return a * b


@rpc("div")
def div(a, b):
    return a / b


def pow(a, b):
    return a**b


def sub(a, b):
    return a - b


# Register with auto generated name
rpc.register(pow)
rpc.register(sub, "sub")
