"""python -m convcore {demo,bench}"""
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench import main as run
    elif command in ("-h", "--help", "help"):
        print("usage: python -m convcore {demo,bench} [options]\n"
              "  demo   the lecture's worked examples and a short AlexNet timing\n"
              "  bench  AlexNet conv layers vs numpy im2col (and PyTorch if installed)")
        return
    else:
        raise SystemExit(f"unknown command {command!r}: use 'demo' or 'bench'")
    run(argv)


if __name__ == "__main__":
    main()
