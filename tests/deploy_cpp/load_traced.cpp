// Runs a TorchScript module traced from a myrnn_fast model, from C++ with libtorch only:
//   load_traced EXTENSION MODULE INPUT OUTPUT
// loads the extension library (which registers torch.ops.myrnn_fast.*), then the module, runs it
// on the tensor saved (torch.save) in INPUT and saves its outputs (a tuple) to OUTPUT, which
// Python reads with torch.load.
#include <dlfcn.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

static std::vector<char> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: load_traced EXTENSION MODULE INPUT OUTPUT\n";
    return 2;
  }
  // The ops must be registered before the module that calls them is loaded.
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "loading the extension failed: " << dlerror() << "\n";
    return 3;
  }
  torch::jit::script::Module module = torch::jit::load(argv[2]);
  module.eval();
  torch::Tensor input = torch::pickle_load(read_file(argv[3])).toTensor();
  c10::IValue result = module.forward({input});
  std::vector<char> bytes = torch::pickle_save(result);
  std::ofstream(argv[4], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return 0;
}
