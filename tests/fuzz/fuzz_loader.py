"""Coverage-guided fuzzing (atheris, libFuzzer's engine) of the Python
model-file loader: convcore.load_state_dict_file and convcore.load on
mutated model files (the C++ reader checks the header and the network graph
for both), then a forward pass of what loads, eager and compiled (the C++
engine, compiled from the graph of the file).

    python tests/fuzz/fuzz_loader.py [libFuzzer flags] CORPUS_DIR
    python tests/fuzz/fuzz_loader.py -max_total_time=30 -seed=1 /tmp/corpus

The corpus directory is seeded (when empty) with small models saved by
convcore.save and the C++ tests' model files. Each input must load (and run)
or raise ValueError / TypeError / MemoryError with a message; any other
exception is reported by atheris as a crash, with the input saved to
crash-<hash>. The corpus it grows is replayed by the C++ fuzzer
(tests/cpp/fuzz_load) under AddressSanitizer, so both loaders see the same
coverage-guided files.
"""
import os
import sys
import tempfile

try:
    import atheris
except ImportError:  # one_input() still works, for replaying files (tests/test_fuzz_loader.py)
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["convcore"]):
        import numpy as np
        import convcore
else:
    import numpy as np
    import convcore

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_DATA = os.path.join(HERE, "..", "cpp", "data")
_TMP = os.path.join(tempfile.gettempdir(), f"convcore_atheris_{os.getpid()}.safetensors")
ALLOWED = (ValueError, TypeError, MemoryError)


def seed_corpus(directory: str) -> None:
    """Small, valid models of several kinds, so that mutations start from
    files that get far into the loader."""
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return
    convcore.manual_seed(0)
    models = {
        "seq.safetensors": convcore.build("CONV3-4-RELU-POOL2-FC-3", (1, 8, 8)),
        "bn_gap.safetensors": convcore.build("CONV3-4-BN-RELU-GAP-FC-2", (2, 6, 6)),
        "block.safetensors": convcore.nn.Sequential(convcore.nn.BasicBlock(2, 4, stride=2)),
        "linear.safetensors": convcore.nn.Sequential(convcore.nn.Linear(5, 3),
                                                     convcore.nn.ReLU()),
    }
    for name, model in models.items():
        convcore.save(model, os.path.join(directory, name))
    convcore.io.save_state_dict_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                      "b": np.zeros(0, np.float64)},
                                     os.path.join(directory, "plain.safetensors"))
    if os.path.isdir(CPP_DATA):
        for name in sorted(os.listdir(CPP_DATA)):
            if name.startswith("net_") and not name.endswith("_io.safetensors"):
                with open(os.path.join(CPP_DATA, name), "rb") as src, \
                        open(os.path.join(directory, "cpp_" + name), "wb") as dst:
                    dst.write(src.read())


def one_input(data: bytes) -> None:
    with open(_TMP, "wb") as f:
        f.write(data)
    try:
        convcore.load_state_dict_file(_TMP)
    except ALLOWED as e:
        assert str(e), f"{type(e).__name__} without a message"
    try:
        model = convcore.load(_TMP)
    except ALLOWED as e:
        assert str(e), f"{type(e).__name__} without a message"
        return
    shape = getattr(model, "input_shape", None)
    if shape and int(np.prod(shape)) <= 4096:  # a forward pass only where it is cheap
        model.eval()
        x = np.zeros((1,) + tuple(shape), model.dtype)
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
    try:
        atheris.Fuzz()
    finally:
        if os.path.exists(_TMP):
            os.remove(_TMP)


if __name__ == "__main__":
    main(sys.argv)
