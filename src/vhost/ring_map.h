// Internal to vhost: the translation of a ring's addresses into a memory table (Device makes
// one per set of addresses, size, layout and table, and keeps it).
#pragma once

#include <cstddef>
#include <cstdint>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/vhost/queue.h"

namespace vhostkit::vhost {

// The bytes of each of a ring's three parts, as vhost-user's SET_VRING_ADDR names them (desc,
// avail, used). Packed: the descriptor ring, the driver event suppression area (carried as
// "avail") and the device's (carried as "used").
struct RingPartBytes {
  std::size_t desc = 0;
  std::size_t avail = 0;
  std::size_t used = 0;
};
RingPartBytes ring_part_bytes(std::uint32_t num, bool packed) noexcept;

// The ring sizes each layout allows: split, a power of two in 1..32768 (the avail and used
// rings are indexed modulo the size); packed, any size in 1..32768.
bool valid_ring_size(std::uint32_t num, bool packed) noexcept;

// The one translation of a ring: the three parts of a ring of `num` entries at `a` in the
// given layout, each inside one region of `m`, and the words the ring accesses atomically
// aligned in host memory too (a region whose mmap_offset and userspace_addr differ in alignment
// moves them; atomic_ref needs them aligned). A size the layout does not allow is refused here
// as well: the layout is known only once the features are. Its result is kept (Queue::mapped)
// and handed to the worker as it is.
Result<MappedRing> translate_ring(const memory::GuestMemory& m, const memory::VringAddr& a,
                                  std::uint32_t num, std::uint32_t index, bool packed);

}  // namespace vhostkit::vhost
