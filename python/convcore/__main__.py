"""python -m convcore {demo,bench,summary} | --cmake-dir | --include-dir"""
import os
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command in ("--cmake-dir", "--include-dir"):
        print(_native_dir(command))
        return
    if command == "demo":
        from .demo import main as run
    elif command == "bench" and "--gpu" in argv:  # the CUDA kernels vs PyTorch CUDA
        argv.remove("--gpu")
        from .cuda.bench import main as run
    elif command == "bench":
        from .bench import main as run
    elif command == "summary":
        run = _summary
    elif command in ("-h", "--help", "help"):
        print("usage: python -m convcore {demo,bench,summary} [options]\n"
              "  demo      the lecture's worked examples, then LeNet-5 trained on the digits\n"
              "  bench     AlexNet conv layers vs numpy im2col (and PyTorch if installed)\n"
              "  bench --e2e  whole models, images/s, vs PyTorch\n"
              "  bench --zoo  every distinct conv/linear layer of the zoo, forward and\n"
              "               backward at batch 1 and 16, vs PyTorch and the measured peak\n"
              "  bench --gpu  the CUDA kernels vs PyTorch CUDA/cuDNN (needs a GPU)\n"
              "  summary   the layer table of a zoo model: summary alexnet [--all]\n"
              "  --cmake-dir    the directory of convcoreConfig.cmake, for C++ apps:\n"
              "                 cmake -Dconvcore_DIR=\"$(python -m convcore --cmake-dir)\" ...\n"
              "  --include-dir  the directory of the C++ headers (convcore/*.h)")
        return
    else:
        raise SystemExit(f"unknown command {command!r}: use 'demo', 'bench' or 'summary'")
    run(argv)


def _native_dir(option: str) -> str:
    """Where the installed package keeps the C++ library's CMake config or
    headers (installed by pip with the package, as pybind11 does)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if option == "--cmake-dir":
        path, marker = os.path.join(here, "lib", "cmake", "convcore"), "convcoreConfig.cmake"
    else:
        path, marker = os.path.join(here, "include"), os.path.join("convcore", "convcore.h")
    if not os.path.isfile(os.path.join(path, marker)):
        raise SystemExit(f"{option}: this convcore ({here}) has no C++ library installed with it "
                         f"(no {os.path.join(path, marker)}); install the package with pip "
                         f"(pip install .), or build and `cmake --install` the C++ library")
    return path


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
