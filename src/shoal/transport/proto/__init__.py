"""Generated protobuf and gRPC modules for shoal.v1 (see shoal.proto); only shoal.transport imports them."""
