"""Generate dt_trio/_proto from protos/*.proto (the Durable Task protocol, gRPC health).

    python protos/generate.py           # rewrite dt_trio/_proto
    python protos/generate.py --check   # exit 1 if the committed code is stale

Needs grpcio-tools (the pinned version below) and purerpc's protoc plugin. protoc's output gets two
mechanical rewrites so that it can live privately inside dt_trio:

* the purerpc stub imports its sibling module relatively;
* the messages are registered in a private descriptor pool. The protocol's messages have no
  package, so registering them in protobuf's default pool would clash with any official SDK
  imported in the same process ("duplicate symbol 'OrchestrationStatus'"); grpc.health.v1's
  would clash with grpcio-health-checking's.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE.parent / "dt_trio" / "_proto"
GRPCIO_TOOLS = "grpcio-tools==1.85.1"
# Each proto file, with the well-known types it imports.
PROTOS = {
    "orchestrator_service": ("timestamp", "duration", "wrappers", "empty", "struct"),
    "health": (),
}
FILES = tuple(
    f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_grpc.py")
)


def render() -> dict[str, str]:
    """Run protoc and return {file name: rewritten source}."""
    plugin = shutil.which("protoc-gen-purerpc") or str(
        pathlib.Path(sys.executable).parent / "protoc-gen-purerpc"
    )
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{HERE}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--purerpc_out={tmp}",
                f"--plugin=protoc-gen-purerpc={plugin}",
                *(str(HERE / f"{name}.proto") for name in PROTOS),
            ],
            check=True,
        )
        out = {name: (pathlib.Path(tmp) / name).read_text() for name in FILES}
    for name, well_known in PROTOS.items():
        out[f"{name}_pb2.py"] = _private_pool(out[f"{name}_pb2.py"], well_known)
        out[f"{name}_grpc.py"] = out[f"{name}_grpc.py"].replace(
            f"import {name}_pb2 as", f"from . import {name}_pb2 as"
        )
    return out


def _private_pool(source: str, well_known: tuple[str, ...]) -> str:
    deps = ", ".join(f"google_dot_protobuf_dot_{name}__pb2" for name in well_known)
    replacement = (
        "_POOL = _descriptor_pool.DescriptorPool()\n"
        + (
            f"for _dep in ({deps}):\n  _POOL.AddSerializedFile(_dep.DESCRIPTOR.serialized_pb)\n"
            if well_known
            else ""
        )
        + "DESCRIPTOR = _POOL.AddSerializedFile("
    )
    new, count = re.subn(
        r"^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(",
        replacement,
        source,
        flags=re.M,
    )
    if count != 1:
        raise RuntimeError("protoc output changed shape: the descriptor registration is not found")
    return new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    rendered = render()
    if args.check:
        stale = [
            n
            for n, text in rendered.items()
            if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != text
        ]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run `nox -s protos`")
            return 1
        print("generated code is up to date")
        return 0
    for name, text in rendered.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(rendered)} files to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
