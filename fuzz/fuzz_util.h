// Shared by the fuzz targets: a reader over the input, and the count of fds a target may leak.
#pragma once

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string_view>

namespace vhostkit::fuzz {

// Reads the input front to back; past its end every read yields zeros.
struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  void bytes(void* dst, std::size_t len) {
    const std::size_t k = std::min(len, n);
    std::memcpy(dst, p, k);
    std::memset(static_cast<std::uint8_t*>(dst) + k, 0, len - k);
    p += k;
    n -= k;
  }
};

// Open fds of the kinds vhostkit creates (sockets; eventfds, epoll and io_uring, which are anon
// inodes; memfds). libFuzzer opens and closes pipes and /dev/null of its own between inputs, so
// those are not counted. `print` lists the counted ones on stderr (to name a leak).
inline std::size_t fd_count(bool print = false) {
  std::size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char path[300], target[256];
    std::snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    const ssize_t len = ::readlink(path, target, sizeof target - 1);
    if (len <= 0) continue;
    const std::string_view t(target, static_cast<std::size_t>(len));
    if (t.starts_with("socket:") || t.starts_with("anon_inode:") || t.starts_with("/memfd:")) {
      ++n;
      if (print) std::fprintf(stderr, "  fd %s -> %.*s\n", e->d_name, static_cast<int>(len), target);
    }
  }
  ::closedir(d);
  return n;
}

}  // namespace vhostkit::fuzz
