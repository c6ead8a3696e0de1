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

#include "vhostkit/virtio/ring.h"

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
      if (print)
        std::fprintf(stderr, "  fd %s -> %.*s\n", e->d_name, static_cast<int>(len), target);
    }
  }
  ::closedir(d);
  return n;
}

// Does a buffer the device may follow from the descriptor table at `guest + table` (qsize
// entries, or an indirect table one of them points to) start below `data`, i.e. over the rings?
// The device writes into such buffers as told, so the guest may scribble over its own rings and
// ring checks prove nothing. `guest` holds `guest_bytes` bytes from guest-physical 0.
inline bool buffers_may_hit_rings(const std::uint8_t* guest, std::uint64_t guest_bytes,
                                  std::uint64_t table, std::uint16_t qsize, std::uint64_t data) {
  auto hits = [data](const virtio::VirtqDesc& d) { return d.len != 0 && d.addr < data; };
  for (std::uint16_t i = 0; i < qsize; ++i) {
    virtio::VirtqDesc d;
    std::memcpy(&d, guest + table + i * sizeof d, sizeof d);
    if (hits(d)) return true;
    if ((d.flags & virtio::kDescFIndirect) == 0 || d.addr >= guest_bytes) continue;
    const std::size_t n =
        std::min<std::uint64_t>(d.len, guest_bytes - d.addr) / sizeof(virtio::VirtqDesc);
    for (std::size_t j = 0; j < n; ++j) {
      virtio::VirtqDesc e;
      std::memcpy(&e, guest + d.addr + j * sizeof e, sizeof e);  // may be unaligned
      if (hits(e)) return true;
    }
  }
  return false;
}

}  // namespace vhostkit::fuzz
