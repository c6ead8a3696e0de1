// Helpers shared by the memory module's tests: memfds and leak counters.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "vhostkit/unique_fd.h"

namespace vhostkit::memory::testing {

inline UniqueFd make_memfd(std::uint64_t size) {
  UniqueFd fd(::memfd_create("vhostkit-test", MFD_CLOEXEC));
  if (fd.valid() && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) fd.reset();
  return fd;
}

inline UniqueFd dup_fd(const UniqueFd& fd) { return UniqueFd(::dup(fd.get())); }

inline std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// Lines of /proc/self/maps backed by our test memfds. Counting every line would be noisy: the
// allocator (ASan's especially) maps memory of its own while a test runs.
inline std::size_t mapping_count() {
  std::ifstream maps("/proc/self/maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/memfd:vhostkit-test") != std::string::npos) ++n;
  }
  return n;
}

// True if some mapping in /proc/self/maps starts at `addr`.
inline bool is_mapping_start(const void* addr) {
  std::ifstream maps("/proc/self/maps");
  const auto want = reinterpret_cast<std::uintptr_t>(addr);
  for (std::string line; std::getline(maps, line);) {
    if (std::stoull(line.substr(0, line.find('-')), nullptr, 16) == want) return true;
  }
  return false;
}

}  // namespace vhostkit::memory::testing
