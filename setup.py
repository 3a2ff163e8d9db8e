"""Build steps pyproject.toml cannot express: the C extension and the gRPC stubs.

The stubs are generated from proto/vas/v1/*.proto as the package ``vas.v1``
(protoc names generated modules after the .proto path, so
``import "vas/v1/types.proto"`` becomes ``from vas.v1 import types_pb2``).
They are never committed or edited by hand.

Where they go depends on the kind of install:

- a wheel (``pip install .``, ``python -m build``): into the build tree, next to
  the other modules of the wheel;
- an editable install (``pip install -e .``): into the source package, as
  src/vas/v1/ (ignored by git), because an editable install imports vas from
  src/vas/ and never looks at the build tree. setuptools builds the extension
  in place (src/vas/_native*.so) for the same reason.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PROTO_ROOT = "proto"
PROTO_DIR = os.path.join(PROTO_ROOT, "vas", "v1")


class BuildPyWithProtos(build_py):
    """build_py that also runs protoc (grpcio-tools) over proto/vas/v1."""

    def run(self):
        super().run()
        if self.editable_mode:
            # get_package_dir("vas") is "src/vas"; protoc adds the vas/v1/ part itself.
            self.generate_protos(os.path.dirname(self.get_package_dir("vas")))
        else:
            self.generate_protos(self.build_lib)

    def generate_protos(self, out_dir):
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(
            os.path.join(PROTO_DIR, f) for f in os.listdir(PROTO_DIR) if f.endswith(".proto")
        )
        if not protos:
            raise RuntimeError(f"no .proto files in {PROTO_DIR}")
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        target = os.path.join(out_dir, "vas", "v1")
        os.makedirs(target, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
        with open(os.path.join(target, "__init__.py"), "w") as init:
            init.write('"""Generated from proto/vas/v1 by setup.py; do not edit."""\n')


setup(
    cmdclass={"build_py": BuildPyWithProtos},
    ext_modules=[
        Extension(
            "vas._native",
            sources=["native/vasnative.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
    ],
)
