// The one translation of a ring's addresses (see ring_map.h).
#include "ring_map.h"

#include <cstdint>

#include <fmt/format.h>

#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

Result<MappedRing> translate_ring(const memory::GuestMemory& m, const memory::VringAddr& a,
                                  std::uint32_t num, std::uint32_t index) {
  auto missing = [&](const char* what, std::uint64_t uva, std::size_t len) {
    return fail(Errc::not_mapped,
                fmt::format("vring {}: {} at 0x{:x} ({} bytes for size {}) is not inside one "
                            "memory region",
                            index, what, uva, len, num));
  };
  auto misaligned = [&](const char* what, std::uint64_t uva, const void* host, std::size_t align) {
    return fail(Errc::invalid_argument,
                fmt::format("vring {}: {} at 0x{:x} lands at host address {} which is not "
                            "{}-byte aligned (its region's mmap_offset and userspace_addr "
                            "differ in alignment)",
                            index, what, uva, host, align));
  };
  const std::size_t dl = virtio::desc_table_bytes(num);
  const std::size_t al = virtio::avail_ring_bytes(num);
  const std::size_t ul = virtio::used_ring_bytes(num);
  auto* d = m.uva_to_host(a.desc_user_addr, dl);
  if (d == nullptr) return missing("desc table", a.desc_user_addr, dl);
  auto* av = m.uva_to_host(a.avail_user_addr, al);
  if (av == nullptr) return missing("avail ring", a.avail_user_addr, al);
  auto* u = m.uva_to_host(a.used_user_addr, ul);
  if (u == nullptr) return missing("used ring", a.used_user_addr, ul);
  // Descriptors are copied out through untyped pointers; only the index words need alignment.
  if (reinterpret_cast<std::uintptr_t>(av) % virtio::kAvailAlign != 0) {
    return misaligned("avail ring", a.avail_user_addr, av, virtio::kAvailAlign);
  }
  if (reinterpret_cast<std::uintptr_t>(u) % virtio::kUsedAlign != 0) {
    return misaligned("used ring", a.used_user_addr, u, virtio::kUsedAlign);
  }
  MappedRing r;
  r.parts.desc = reinterpret_cast<virtio::VirtqDesc*>(d);
  r.parts.avail = reinterpret_cast<virtio::VirtqAvail*>(av);
  r.parts.used = reinterpret_cast<virtio::VirtqUsed*>(u);
  r.parts.size = static_cast<std::uint16_t>(num);
  // The used ring translated into one region, so its guest address exists.
  r.used_gpa = m.uva_to_gpa(a.used_user_addr).value_or(0);
  return r;
}

}  // namespace vhostkit::vhost
