// The one translation of a ring's addresses (see ring_map.h).
#include "ring_map.h"

#include <cstdint>

#include <fmt/format.h>

#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

RingPartBytes ring_part_bytes(std::uint32_t num, bool packed) noexcept {
  if (packed) {
    return RingPartBytes{sizeof(virtio::PackedDesc) * std::size_t{num},
                         sizeof(virtio::PackedEventSuppress), sizeof(virtio::PackedEventSuppress)};
  }
  return RingPartBytes{virtio::desc_table_bytes(num), virtio::avail_ring_bytes(num),
                       virtio::used_ring_bytes(num)};
}

bool valid_ring_size(std::uint32_t num, bool packed) noexcept {
  return packed ? virtio::is_valid_packed_queue_size(num) : virtio::is_valid_queue_size(num);
}

Result<MappedRing> translate_ring(const memory::GuestMemory& m, const memory::VringAddr& a,
                                  std::uint32_t num, std::uint32_t index, bool packed) {
  if (!valid_ring_size(num, packed)) {
    return fail(Errc::invalid_argument,
                fmt::format("vring {}: size {} is not allowed for a {} ring ({})", index, num,
                            packed ? "packed" : "split",
                            packed ? "1..32768" : "a power of two in 1..32768"));
  }
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
  const RingPartBytes bytes = ring_part_bytes(num, packed);
  const char* names[3] = {"desc table", "avail ring", "used ring"};
  if (packed) {
    names[0] = "desc ring";
    names[1] = "driver event area";
    names[2] = "device event area";
  }
  auto* d = m.uva_to_host(a.desc_user_addr, bytes.desc);
  if (d == nullptr) return missing(names[0], a.desc_user_addr, bytes.desc);
  auto* av = m.uva_to_host(a.avail_user_addr, bytes.avail);
  if (av == nullptr) return missing(names[1], a.avail_user_addr, bytes.avail);
  auto* u = m.uva_to_host(a.used_user_addr, bytes.used);
  if (u == nullptr) return missing(names[2], a.used_user_addr, bytes.used);
  // Split descriptors are copied out through untyped pointers; only the index words need
  // alignment. Packed: each descriptor's flags and both event areas are accessed atomically.
  const std::size_t desc_align = packed ? virtio::kPackedDescAlign : 1;
  const std::size_t avail_align = packed ? virtio::kEventSuppressAlign : virtio::kAvailAlign;
  const std::size_t used_align = packed ? virtio::kEventSuppressAlign : virtio::kUsedAlign;
  if (reinterpret_cast<std::uintptr_t>(d) % desc_align != 0) {
    return misaligned(names[0], a.desc_user_addr, d, desc_align);
  }
  if (reinterpret_cast<std::uintptr_t>(av) % avail_align != 0) {
    return misaligned(names[1], a.avail_user_addr, av, avail_align);
  }
  if (reinterpret_cast<std::uintptr_t>(u) % used_align != 0) {
    return misaligned(names[2], a.used_user_addr, u, used_align);
  }
  MappedRing r;
  r.packed = packed;
  if (packed) {
    r.packed_parts.desc = reinterpret_cast<virtio::PackedDesc*>(d);
    r.packed_parts.driver_event = reinterpret_cast<virtio::PackedEventSuppress*>(av);
    r.packed_parts.device_event = reinterpret_cast<virtio::PackedEventSuppress*>(u);
    r.packed_parts.size = static_cast<std::uint16_t>(num);
  } else {
    r.parts.desc = reinterpret_cast<virtio::VirtqDesc*>(d);
    r.parts.avail = reinterpret_cast<virtio::VirtqAvail*>(av);
    r.parts.used = reinterpret_cast<virtio::VirtqUsed*>(u);
    r.parts.size = static_cast<std::uint16_t>(num);
  }
  // Each part translated into one region, so its guest address exists.
  r.used_gpa = m.uva_to_gpa(a.used_user_addr).value_or(0);
  r.desc_gpa = m.uva_to_gpa(a.desc_user_addr).value_or(0);
  r.device_event_gpa = r.used_gpa;
  return r;
}

}  // namespace vhostkit::vhost
