"""Generated protobuf/gRPC code for ``protos/llmsched/v1`` (regenerate with ``python -m scheduler._proto.generate``).

Import as ``from scheduler._proto.llmsched.v1 import inference_pb2, inference_pb2_grpc, admin_pb2, admin_pb2_grpc``.
"""
