"""Compile proto/*.proto into the `tandem.proto` package (`make proto`).

The sources import each other as `tandem/proto/NAME.proto`, the path their modules have in the
`tandem` namespace, so they are staged under that path for protoc: the generated modules then
import `tandem.proto.NAME_pb2` and register unique names in protobuf's global descriptor pool.
`python proto/build.py --out DIR` writes elsewhere (the freshness test compares the two).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(HERE.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp, "src", "tandem", "proto")
        stage.mkdir(parents=True)
        for src in sources:
            shutil.copy(src, stage / src.name)
        gen = Path(tmp, "gen")
        gen.mkdir()
        include = Path(protoc.__file__).parent / "_proto"  # the well-known types
        args = ["protoc", f"-I{Path(tmp, 'src')}", f"-I{include}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}", *[f"tandem/proto/{s.name}" for s in sources]]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted(Path(gen, "tandem", "proto").iterdir()):
            shutil.copy(path, out / path.name)
            written.append(out / path.name)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where the modules go (default: proto/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
