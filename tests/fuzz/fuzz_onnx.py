"""Coverage-guided fuzzing (atheris, libFuzzer's engine) of the ONNX
importer: convcore.onnx.load on mutated ONNX files, then a forward pass of
what loads, eager and compiled (the C++ engine, compiled from the graph the
importer wrote).

    python tests/fuzz/fuzz_onnx.py [libFuzzer flags] CORPUS_DIR
    python tests/fuzz/fuzz_onnx.py -max_total_time=30 -seed=1 /tmp/onnx_corpus

The corpus directory is seeded (when empty) with small ONNX models written
by convcore.onnx.export (convolutions, pooling, batch norm, joins, linear
layers). Each input must load (and run) or raise ValueError, TypeError,
NotImplementedError (a valid op convcore does not compute) or MemoryError
with a message; any other exception is reported by atheris as a crash, with
the input saved to crash-<hash>.
"""
import os
import sys

try:
    import atheris
except ImportError:  # one_input() still works, for the random mutations of the tests
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["convcore"]):
        import numpy as np
        import convcore
else:
    import numpy as np
    import convcore

ALLOWED = (ValueError, TypeError, NotImplementedError, MemoryError)


def seed_corpus(directory: str) -> None:
    """Small, valid ONNX files of several kinds, so that mutations start from
    files that get far into the importer."""
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return
    convcore.manual_seed(0)
    models = {
        "seq.onnx": (convcore.build("CONV3-4-RELU-POOL2-FC-3", (1, 8, 8)), (1, 8, 8)),
        "bn_gap.onnx": (convcore.build("CONV3-4-BN-RELU-GAP-FC-2", (2, 6, 6)), (2, 6, 6)),
        "block.onnx": (convcore.nn.Sequential(convcore.nn.BasicBlock(2, 4, stride=2)),
                       (2, 6, 6)),
        "linear.onnx": (convcore.nn.Sequential(convcore.nn.Linear(5, 3), convcore.nn.ReLU()),
                        (5,)),
        "inception.onnx": (convcore.build_graph(
            {"b1": "CONV1-4-RELU", "b2": "MAXPOOL3/s1/p1-CONV1-2"},
            ["y1 = b1(x)", "y2 = b2(x)", "out = concat(y1, y2)"], input_shape=(3, 6, 6)),
            (3, 6, 6)),
    }
    for name, (model, shape) in models.items():
        convcore.onnx.export(model.eval(), os.path.join(directory, name), shape, opset=13)


def one_input(data: bytes) -> None:
    try:
        model = convcore.onnx.load(data)
    except ALLOWED as e:
        assert str(e), f"{type(e).__name__} without a message"
        return
    shape = getattr(model, "input_shape", None)
    if shape and int(np.prod(shape)) <= 4096:  # a forward pass only where it is cheap
        model.eval()
        x = np.zeros((1,) + tuple(shape), np.float32)
        try:
            model(x)
        except ALLOWED:
            pass
        try:  # the engine on the same model (its own compile-time checks)
            convcore.compile(model)(x)
        except ALLOWED as e:
            assert str(e), f"{type(e).__name__} without a message"


def main(argv):
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for directory in corpus[:1]:
        seed_corpus(directory)
    convcore.set_num_threads(1)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
