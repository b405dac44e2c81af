"""The ``fewstep`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fewstep", description="fewstep: few-step diffusion on fused kernels")
    parser.add_argument("command", choices=["demo", "info"], help="demo: few-step sampling with timings; "
                        "info: how fewstep was built")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from fewstep import demo
        demo.main(argv[1:])
    else:
        import fewstep
        print(fewstep.build_info())


if __name__ == "__main__":
    main()
