// Virtqueue wire layouts: split (virtio 1.2, 2.7) and packed (2.8). All fields little-endian;
// vhostkit runs on little-endian hosts only (checked below), so the structs are read in place.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace vhostkit::virtio {

static_assert(std::endian::native == std::endian::little,
              "vhostkit reads virtio's little-endian rings in place");

inline constexpr std::uint16_t kMaxQueueSize = 32768;

// Descriptor flags.
inline constexpr std::uint16_t kDescFNext = 1;
inline constexpr std::uint16_t kDescFWrite = 2;
inline constexpr std::uint16_t kDescFIndirect = 4;

// avail->flags: the driver asks the device not to interrupt (ignored with EVENT_IDX).
inline constexpr std::uint16_t kAvailFNoInterrupt = 1;
// used->flags: the device asks the driver not to notify (ignored with EVENT_IDX).
inline constexpr std::uint16_t kUsedFNoNotify = 1;

// The vhost ABI's ring-address flag (VHOST_VRING_F_LOG, linux/vhost_types.h), which vhost-user's
// SET_VRING_ADDR carries too: log the device's used-ring writes for live migration.
inline constexpr std::uint32_t kVhostVringFLog = 1u << 0;

struct VirtqDesc {
  std::uint64_t addr;  // guest-physical
  std::uint32_t len;
  std::uint16_t flags;
  std::uint16_t next;
};
static_assert(sizeof(VirtqDesc) == 16);
static_assert(offsetof(VirtqDesc, addr) == 0);
static_assert(offsetof(VirtqDesc, len) == 8);
static_assert(offsetof(VirtqDesc, flags) == 12);
static_assert(offsetof(VirtqDesc, next) == 14);

// struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
struct VirtqAvail {
  std::uint16_t flags;
  std::uint16_t idx;
  std::uint16_t ring[];  // followed by used_event (with EVENT_IDX)
};
static_assert(offsetof(VirtqAvail, flags) == 0);
static_assert(offsetof(VirtqAvail, idx) == 2);
static_assert(offsetof(VirtqAvail, ring) == 4);

struct VirtqUsedElem {
  std::uint32_t id;   // head of the chain (a descriptor index, so < queue size)
  std::uint32_t len;  // bytes the device wrote into the chain's writable part
};
static_assert(sizeof(VirtqUsedElem) == 8);

// struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size]; le16 avail_event; }
struct VirtqUsed {
  std::uint16_t flags;
  std::uint16_t idx;
  VirtqUsedElem ring[];  // followed by avail_event (with EVENT_IDX)
};
static_assert(offsetof(VirtqUsed, flags) == 0);
static_assert(offsetof(VirtqUsed, idx) == 2);
static_assert(offsetof(VirtqUsed, ring) == 4);

// Alignment the spec requires of each part (2.7, table "Virtqueue Part Alignment").
inline constexpr std::size_t kDescAlign = 16;
inline constexpr std::size_t kAvailAlign = 2;
inline constexpr std::size_t kUsedAlign = 4;

constexpr std::size_t desc_table_bytes(std::uint32_t size) { return 16u * std::size_t{size}; }
// Includes the trailing used_event word.
constexpr std::size_t avail_ring_bytes(std::uint32_t size) { return 6u + 2u * std::size_t{size}; }
// Includes the trailing avail_event word.
constexpr std::size_t used_ring_bytes(std::uint32_t size) { return 6u + 8u * std::size_t{size}; }

constexpr bool is_valid_queue_size(std::uint32_t size) {
  return size != 0 && size <= kMaxQueueSize && (size & (size - 1)) == 0;
}

// The event-idx rule (2.7.10): notify iff new_idx has passed event_idx since old_idx.
// All arithmetic is modulo 2^16.
constexpr bool vring_need_event(std::uint16_t event_idx, std::uint16_t new_idx,
                                std::uint16_t old_idx) {
  return static_cast<std::uint16_t>(new_idx - event_idx - 1) <
         static_cast<std::uint16_t>(new_idx - old_idx);
}

// ---- Packed virtqueue (virtio 1.2, 2.8): one descriptor ring written by both sides, and two
// event suppression structures. Sizes need not be powers of two (1..32768).

// Descriptor flags of the packed ring, besides NEXT, WRITE and INDIRECT above. A descriptor is
// available when AVAIL matches the driver's wrap counter and USED does not; used when both
// match the device's wrap counter.
inline constexpr std::uint16_t kDescFAvail = 1u << 7;
inline constexpr std::uint16_t kDescFUsed = 1u << 15;

// Event suppression flags (2.8.10): enable, disable, or only at the descriptor named by
// off_wrap (valid with VIRTIO_F_EVENT_IDX only). The value 3 is reserved.
inline constexpr std::uint16_t kRingEventFlagsEnable = 0;
inline constexpr std::uint16_t kRingEventFlagsDisable = 1;
inline constexpr std::uint16_t kRingEventFlagsDesc = 2;
inline constexpr std::uint16_t kRingEventFlagsMask = 3;
// off_wrap: bits 0-14 the descriptor offset, bit 15 the wrap counter.
inline constexpr std::uint16_t kEventWrapBit = 1u << 15;

// struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
struct PackedDesc {
  std::uint64_t addr;  // guest-physical
  std::uint32_t len;
  std::uint16_t id;  // buffer id: in the last descriptor of a chain
  std::uint16_t flags;
};
static_assert(sizeof(PackedDesc) == 16);
static_assert(offsetof(PackedDesc, addr) == 0);
static_assert(offsetof(PackedDesc, len) == 8);
static_assert(offsetof(PackedDesc, id) == 12);
static_assert(offsetof(PackedDesc, flags) == 14);

// struct pvirtq_event_suppress { le16 desc (off:15, wrap:1); le16 flags; }
// Aligned to 4 as the spec places it: both sides access it as one 32-bit word (atomic_ref), which
// clang inlines only when the type says it is aligned (else a libatomic call).
struct alignas(4) PackedEventSuppress {
  std::uint16_t off_wrap;
  std::uint16_t flags;
};
static_assert(sizeof(PackedEventSuppress) == 4 && alignof(PackedEventSuppress) == 4);

// Alignment the spec requires of each part (2.8.10.1).
inline constexpr std::size_t kPackedDescAlign = 16;
inline constexpr std::size_t kEventSuppressAlign = 4;

constexpr bool is_valid_packed_queue_size(std::uint32_t size) {
  return size != 0 && size <= kMaxQueueSize;
}

}  // namespace vhostkit::virtio
