// Checks for the CPU kernels. TORCH_CHECK with several message parts builds a std::string and hands it
// to libtorch, which segfaulted on the GPU image (torch 2.11, an extension built by its system compiler);
// a single C string takes the other overload, which works everywhere. So messages are formatted here.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>

#define TANDEM_CHECK(cond, ...)                                          \
  do {                                                                   \
    if (!(cond)) {                                                       \
      char tandem_check_message_[512];                                   \
      std::snprintf(tandem_check_message_, sizeof tandem_check_message_, __VA_ARGS__); \
      TORCH_CHECK(false, static_cast<const char*>(tandem_check_message_)); \
    }                                                                    \
  } while (0)
