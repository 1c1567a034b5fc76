"""Generated protobuf and gRPC code for the two kubelet APIs Plexus speaks.

`deviceplugin_v1beta1.proto` (package `v1beta1`: Registration, DevicePlugin) and
`podresources_v1.proto` (package `v1`: PodResourcesLister) are written for Plexus from the public
API reference and are wire-compatible with kubelet. Only `sriov.deviceplugin` and
`sriov.podresources` import this package (an import contract keeps grpc out of everything else);
the kubelet stand-in in `tests/support/kubelet.py` uses the same modules.

The `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` files are generated; never edit them. Regenerate
from the repository root with

    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \\
        sriov/kubeletapi/deviceplugin_v1beta1.proto sriov/kubeletapi/podresources_v1.proto

(`-I .` with repository-relative paths makes the generated imports absolute,
`from sriov.kubeletapi import ...`, so no post-processing is needed). The generated code checks
at import time that the installed grpcio and protobuf are at least the versions of the
grpcio-tools that generated it.
"""
