"""The ``fewstep`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fewstep", description="fewstep: few-step diffusion on fused kernels")
    parser.add_argument("command", choices=["demo", "samplers", "info"],
                        help="demo: distill a teacher into 1-4 step students and measure them; "
                        "samplers: few-step sampling of an exact model, with kernel timings; info: how fewstep was built")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from fewstep import demo
        demo.main(argv[1:])
    elif args.command == "samplers":
        from fewstep.demo import samplers
        samplers.main(argv[1:])
    else:
        import fewstep
        print(fewstep.build_info())


if __name__ == "__main__":
    main()
