// Internal to vhost: the translation of a ring's addresses into a memory table (Device makes
// one per set of addresses, size and table, and keeps it).
#pragma once

#include <cstdint>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/vhost/queue.h"

namespace vhostkit::vhost {

// The one translation of a ring: the three parts of a ring of `num` entries at `a`, each
// inside one region of `m`, and the index words aligned in host memory too (a region whose
// mmap_offset and userspace_addr differ in alignment moves them; atomic_ref needs them
// aligned). Its result is kept (Queue::mapped) and handed to the worker as it is.
Result<MappedRing> translate_ring(const memory::GuestMemory& m, const memory::VringAddr& a,
                                  std::uint32_t num, std::uint32_t index);

}  // namespace vhostkit::vhost
