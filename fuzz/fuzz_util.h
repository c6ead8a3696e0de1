// Shared by the fuzz targets: a reader over the input, and the check of buffers over the rings.
// (The fd and mapping counters are testing/fd_count.h's.)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include <sys/uio.h>

#include "vhostkit/memory/guest_memory.h"
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

// The chain walkers' promise: every piece they hand out lies inside one region of the table.
inline bool inside_memory(const memory::GuestMemory& mem, const iovec& v) {
  const auto* b = static_cast<const std::uint8_t*>(v.iov_base);
  for (const memory::Region& r : mem.regions()) {
    if (b >= r.host && v.iov_len <= r.spec.size &&
        b - r.host <= static_cast<std::ptrdiff_t>(r.spec.size - v.iov_len)) {
      return true;
    }
  }
  return false;
}

}  // namespace vhostkit::fuzz
