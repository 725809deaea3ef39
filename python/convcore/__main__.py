"""python -m convcore {demo,bench}"""
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench import main as run
    elif command == "summary":
        run = _summary
    elif command in ("-h", "--help", "help"):
        print("usage: python -m convcore {demo,bench,summary} [options]\n"
              "  demo      the lecture's worked examples, then LeNet-5 trained on the digits\n"
              "  bench     AlexNet conv layers vs numpy im2col (and PyTorch if installed)\n"
              "  summary   the layer table of a zoo model: summary alexnet [--all]")
        return
    else:
        raise SystemExit(f"unknown command {command!r}: use 'demo', 'bench' or 'summary'")
    run(argv)


def _summary(argv) -> None:
    import argparse

    from . import models
    from .summary import summary

    parser = argparse.ArgumentParser(prog="python -m convcore summary")
    parser.add_argument("model", choices=sorted(models._ZOO))
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs="+", default=None,
                        help="H W or C H W (default: the model's own)")
    parser.add_argument("--all", action="store_true",
                        help="also list ReLU, Dropout and Flatten layers")
    args = parser.parse_args(argv)
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None:
        kwargs["input_size"] = tuple(args.input_size)
    model = models.get(args.model, **kwargs)
    summary(model, model.input_shape, compact=not args.all)


if __name__ == "__main__":
    main()
