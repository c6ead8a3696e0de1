// Fuzzes the packed ring's device side (the chain walker, used writes, event suppression): the
// input is a whole hostile ring.
//   le16        queue size = 1 + v % 1024 (any size, not only powers of two)
//   byte        bit 0: INDIRECT_DESC, bit 1: EVENT_IDX, bit 2: IN_ORDER
//   byte        region count (1..4); then per region 6 bytes:
//               le16 offset into the guest block (x16), le16 size (x16), le16 gpa (x256)
//   le32        the resume point, as GET/SET_VRING_BASE carry it
//   le32        the driver's event suppression (off_wrap, flags)
//   size * 16   descriptor ring
//   rest        contents of the guest block (where indirect tables live)
// Pops until nothing is available or the queue breaks; every returned piece must lie inside a
// registered region, the totals must match the pieces, and the walk must end.
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_util.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/packed_queue.h"

namespace {

using namespace vhostkit;
using fuzz::inside_memory;
using fuzz::Reader;

constexpr std::size_t kBlock = 1 << 16;
alignas(4096) std::uint8_t g_block[kBlock];

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const auto qsize = static_cast<std::uint16_t>(1 + in.u16() % 1024);
  const std::uint8_t fbits = in.u8();
  std::uint64_t features = 0;
  if (fbits & 1) features |= virtio::bit(virtio::feature::ring_indirect_desc);
  if (fbits & 2) features |= virtio::bit(virtio::feature::ring_event_idx);
  if (fbits & 4) features |= virtio::bit(virtio::feature::in_order);

  memory::GuestMemory mem;
  const int nregions = 1 + in.u8() % 4;
  for (int i = 0; i < nregions; ++i) {
    const std::uint64_t off = std::uint64_t{in.u16()} * 16 % kBlock;
    const std::uint64_t len = std::min<std::uint64_t>(std::uint64_t{in.u16()} * 16, kBlock - off);
    const std::uint64_t gpa = std::uint64_t{in.u16()} * 256;
    if (len == 0) continue;
    // Rejected specs (overlaps) are simply not registered.
    (void)mem.add_local_region(memory::RegionSpec{gpa, len, 0x10000000 + gpa, 0}, g_block + off);
  }
  const std::uint32_t base = in.u16() | (std::uint32_t{in.u16()} << 16);
  const std::uint16_t event_off = in.u16();
  const std::uint16_t event_flags = in.u16();

  const auto layout = virtq::PackedRingLayout::for_size(qsize);
  auto* ring = static_cast<std::byte*>(std::aligned_alloc(64, layout.total_bytes));
  std::memset(ring, 0, layout.total_bytes);
  auto* desc = reinterpret_cast<virtio::PackedDesc*>(ring + layout.desc_offset);
  auto* driver_event =
      reinterpret_cast<virtio::PackedEventSuppress*>(ring + layout.driver_event_offset);
  auto* device_event =
      reinterpret_cast<virtio::PackedEventSuppress*>(ring + layout.device_event_offset);
  in.bytes(desc, 16u * qsize);
  *driver_event = virtio::PackedEventSuppress{event_off, event_flags};
  std::memset(g_block, 0, kBlock);
  in.bytes(g_block, std::min(in.n, kBlock));

  virtq::PackedDeviceQueue q;
  q.attach(&mem, virtq::PackedRing{desc, driver_event, device_event, qsize}, features,
           virtq::PackedRingBase::decode(base));
  std::array<iovec, 64> segs{};
  std::vector<std::uint16_t> held;  // answered in reverse, to exercise out-of-order used writes
  std::uint32_t popped = 0;
  while (q.pending() != 0) {
    auto c = q.pop(segs);
    if (!c) {
      if (virtq::breaks_queue(c.error())) break;
      // `empty` after a nonzero pending() is allowed: a driver may claim descriptors in flight
      // available, and the used writes over them take them back. The bound below ends a loop.
    } else {
      std::uint64_t r = 0, w = 0;
      for (const iovec& v : c->readable) {
        if (!inside_memory(mem, v)) std::abort();
        r += v.iov_len;
      }
      for (const iovec& v : c->writable) {
        if (!inside_memory(mem, v)) std::abort();
        w += v.iov_len;
      }
      if (r != c->readable_len || w != c->writable_len) std::abort();
      if (c->readable_len + c->writable_len > 0xffffffffull) std::abort();
      if (c->head >= qsize || c->desc_count == 0) std::abort();
      if (fbits & 8) {
        held.push_back(c->head);
      } else {
        q.push_used(c->head, static_cast<std::uint32_t>(std::min<std::uint64_t>(w, 0xffffffff)));
      }
    }
    // Each pop but an empty one consumes at least one descriptor, and an empty one makes the
    // next pending() look again. Nothing refills the ring (a used descriptor never reads as
    // available), so at most the lap the resume point starts in and the part of the next lap
    // before it are served.
    if (++popped > 2u * qsize) std::abort();
    if (fbits & 16) {
      q.publish_used();
      (void)q.needs_notify();
    }
  }
  for (auto it = held.rbegin(); it != held.rend(); ++it) q.push_used(*it, 0);
  q.publish_used();
  (void)q.needs_notify();
  (void)q.enable_notifications();
  q.disable_notifications();
  const virtq::PackedRingBase after = q.base();
  if (!q.broken() && (after.avail_idx >= qsize || after.used_idx >= qsize)) std::abort();
  std::free(ring);
  return 0;
}
