// Fuzzes the device-side chain walker: the input is a whole hostile ring.
//   byte 0      queue size = 1 << (b % 11)
//   byte 1      bit 0: INDIRECT_DESC, bit 1: EVENT_IDX
//   byte 2      region count (1..4); then per region 6 bytes:
//               le16 offset into the guest block (x16), le16 size (x16), le16 gpa (x256)
//   le16        last_avail_idx
//   le16        avail->idx
//   size * 16   descriptor table
//   size * 2    avail ring
//   rest        contents of the guest block (where indirect tables live)
// Pops until empty or broken; every returned piece must lie inside a registered region and the
// totals must match the pieces.
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
#include "vhostkit/virtq/split_queue.h"

namespace {

using namespace vhostkit;
using fuzz::inside_memory;
using fuzz::Reader;

constexpr std::size_t kBlock = 1 << 16;
alignas(4096) std::uint8_t g_block[kBlock];

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint16_t qsize = static_cast<std::uint16_t>(1u << (in.u8() % 11));
  const std::uint8_t fbits = in.u8();
  std::uint64_t features = 0;
  if (fbits & 1) features |= virtio::bit(virtio::feature::ring_indirect_desc);
  if (fbits & 2) features |= virtio::bit(virtio::feature::ring_event_idx);

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
  const std::uint16_t last_avail = in.u16();
  const std::uint16_t avail_idx = in.u16();

  const auto layout = virtq::DriverRingLayout::for_size(qsize);
  auto* ring = static_cast<std::byte*>(std::aligned_alloc(64, layout.total_bytes));
  std::memset(ring, 0, layout.total_bytes);
  auto* desc = reinterpret_cast<virtio::VirtqDesc*>(ring + layout.desc_offset);
  auto* avail = reinterpret_cast<virtio::VirtqAvail*>(ring + layout.avail_offset);
  auto* used = reinterpret_cast<virtio::VirtqUsed*>(ring + layout.used_offset);
  in.bytes(desc, virtio::desc_table_bytes(qsize));
  in.bytes(avail->ring, 2u * qsize);
  avail->idx = avail_idx;
  std::memset(g_block, 0, kBlock);
  in.bytes(g_block, std::min(in.n, kBlock));

  virtq::DeviceQueue q;
  q.attach(&mem, virtq::SplitRing{desc, avail, used, qsize}, features, last_avail);
  std::array<iovec, 64> segs{};
  std::uint32_t popped = 0;
  while (q.pending() != 0) {
    auto c = q.pop(segs);
    if (!c) {
      if (virtq::breaks_queue(c.error())) break;
      if (c.error() == virtq::ChainError::empty) std::abort();  // pending() said otherwise
      continue;
    }
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
    if (c->desc_count == 0 || c->desc_count > qsize + 1u) std::abort();
    q.push_used(c->head, static_cast<std::uint32_t>(std::min<std::uint64_t>(w, 0xffffffff)));
    if (++popped > qsize) std::abort();  // pending() is bounded by the queue size
  }
  q.publish_used();
  (void)q.needs_notify();
  (void)q.enable_notifications();
  std::free(ring);
  return 0;
}
