// Runs any model saved from Python (model.save(path)) on a tensor, or an ONNX
// model converted by `python -m convcore convert model.onnx model.safetensors`.
//
//   ./run_net MODEL.safetensors                  prints the layer table
//   ./run_net MODEL.safetensors IN OUT [--threads T] [--repeat R]
//       reads the tensor "input" from the safetensors file IN, writes the
//       net's output as the tensor "output" of the safetensors file OUT,
//       and prints the time of one forward pass (the best of R).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "convcore/convcore.h"
#include "convcore/net.h"
#include "convcore/safetensors.h"

int main(int argc, char** argv) {
  if (argc != 2 && argc < 4) {
    std::cerr << "usage: run_net MODEL.safetensors [INPUT.safetensors OUTPUT.safetensors "
                 "[--threads T] [--repeat R]]\n";
    return 2;
  }
  int repeat = 1;
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string opt = argv[i];
    if (opt == "--threads") convcore::set_num_threads(std::stoi(argv[i + 1]));
    else if (opt == "--repeat") repeat = std::max(1, std::stoi(argv[i + 1]));
    else {
      std::cerr << "unknown option " << opt << "\n";
      return 2;
    }
  }
  try {
    const convcore::Net net = convcore::Net::load(argv[1]);
    if (argc == 2) {
      std::cout << net.summary();
      return 0;
    }
    const convcore::Tensor x = convcore::SafetensorsFile::open(argv[2]).read("input");
    convcore::Tensor y;
    double best = 1e300;
    for (int r = 0; r < repeat; ++r) {
      const auto start = std::chrono::steady_clock::now();
      y = net.forward(x);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    convcore::save_safetensors(argv[3], {{"output", y.view()}});
    std::printf("%s: input %s -> output %s in %.3f ms\n", net.name().c_str(),
                x.shape_str().c_str(), y.shape_str().c_str(), best * 1e3);
  } catch (const convcore::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
