"""The gRPC API's messages, generated from the .proto files here by ``make protos`` (committed).

They live in this package's own descriptor pool, not protobuf's default one: tritonclient and KServe's SDK
register the same names (``inference.ModelInferRequest`` ...) in the default pool, and one process could not
hold two of them. With its own pool the server can share a process with either (the tests, or an application
that embeds it).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
