"""python -m convcore {demo,bench,summary,convert} | --cmake-dir | --include-dir"""
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
        from .bench.gpu import main as run
    elif command == "bench":
        from .bench import main as run
    elif command == "summary":
        run = _summary
    elif command == "convert":
        run = _convert
    elif command in ("-h", "--help", "help"):
        print("usage: python -m convcore {demo,bench,summary,convert} [options]\n"
              "  demo      the lecture's worked examples, then LeNet-5 trained on the digits\n"
              "  bench     AlexNet conv layers vs numpy im2col (and PyTorch if installed)\n"
              "  bench --e2e  whole models, images/s, vs PyTorch\n"
              "  bench --zoo  every distinct conv/linear layer of the zoo, forward and\n"
              "               backward at batch 1 and 16, vs PyTorch and the measured peak;\n"
              "               --random N [--seed S]: N random conv layers instead\n"
              "  bench --gpu  the CUDA kernels vs PyTorch CUDA/cuDNN (needs a GPU)\n"
              "  summary   the layer table of a zoo model: summary alexnet [--all]\n"
              "  convert   IN.onnx OUT.safetensors, or IN.safetensors OUT.onnx\n"
              "            [--input-shape C H W] [--opset 17] (docs/onnx.md)\n"
              "  --cmake-dir    the directory of convcoreConfig.cmake, for C++ apps:\n"
              "                 cmake -Dconvcore_DIR=\"$(python -m convcore --cmake-dir)\" ...\n"
              "  --include-dir  the directory of the C++ headers (convcore/*.h)")
        return
    else:
        raise SystemExit(f"unknown command {command!r}: use 'demo', 'bench', 'summary' "
                         f"or 'convert'")
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


def _convert(argv) -> None:
    """ONNX to a convcore file (which native apps run with convcore::Net)
    and back; the direction follows the file extensions."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convcore convert")
    parser.add_argument("input", help="IN.onnx or IN.safetensors")
    parser.add_argument("output", help="OUT.safetensors or OUT.onnx")
    parser.add_argument("--input-shape", type=int, nargs="+", default=None,
                        help="one sample's shape, e.g. 3 224 224 (default: the file's own)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset to write (11-21)")
    args = parser.parse_args(argv)
    src, dst = args.input.lower(), args.output.lower()
    from . import onnx
    from .io import load

    try:
        if src.endswith(".onnx") and dst.endswith(".safetensors"):
            model = onnx.load(args.input, input_shape=args.input_shape)
            model.save(args.output)
        elif src.endswith(".safetensors") and dst.endswith(".onnx"):
            model = load(args.input)
            shape = args.input_shape or getattr(model, "input_shape", None) or \
                _graph_input_shape(args.input)
            onnx.export(model, args.output, shape, opset=args.opset)
        else:
            raise SystemExit(f"convert takes IN.onnx OUT.safetensors or IN.safetensors "
                             f"OUT.onnx, got {args.input!r} {args.output!r}")
    except (ValueError, NotImplementedError, TypeError, OSError) as e:
        raise SystemExit(f"convert: {e}") from None
    shape = getattr(model, "input_shape", None) if args.input_shape is None else \
        tuple(args.input_shape)
    print(f"{args.input} -> {args.output} ({model.num_parameters():,} parameters, input "
          f"{shape})")


def _graph_input_shape(path):
    """The input shape the saved graph declares (docs/format.md), or None."""
    import json

    from .io import load_state_dict_file

    graph = json.loads(load_state_dict_file(path)[1].get("convcore_graph", "{}"))
    return graph.get("input_shape")


if __name__ == "__main__":
    main()
