// The extension module mmrnn_ext._C: the CPU recurrences of every cell (rnn_cpu.cpp, lstm_cpu.cpp,
// gru_cpu.cpp), each file registering its own functions.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmrnn_ext C++ backend: the fused multimodal RNN, LSTM and GRU recurrences on CPU tensors";
  mmrnn::register_rnn(m);
  mmrnn::register_lstm(m);
  mmrnn::register_gru(m);
}
