// Chain shapes the spec allows but DriverQueue never builds: a chain of direct descriptors
// whose last descriptor points at an indirect table. virtio 1.2, 2.7.5.3.2: "The device MUST
// handle the case of zero or more normal chained descriptors followed by a single descriptor
// with flags&VIRTQ_DESC_F_INDIRECT" (the note calls it unusual but valid), and "MUST ignore the
// write-only flag in the descriptor that refers to an indirect table". What stays malformed is
// an INDIRECT descriptor that also has NEXT (2.7.5.3.1), a table inside a table, a readable
// buffer after a writable one anywhere in the whole chain, and more buffers than the queue size
// over the direct part and the table together.
//
// The chains are written straight into the descriptor table and avail ring (no DriverQueue::add),
// and every accepted chain is checked byte for byte through the iovecs the walker returns.
#include <array>
#include <cstring>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kIndirect;
using testing::Rig;
using virtio::kDescFIndirect;
using virtio::kDescFNext;
using virtio::kDescFWrite;
using virtio::VirtqDesc;

constexpr std::uint16_t kSize = 8;
// Where this file's hand-built indirect tables live (inside region A, clear of the rig's own).
constexpr std::uint64_t kTableGpa = Rig::kGpaA + 0x60000;

// A hand-built ring: descriptors written in place, heads published one at a time.
class Hand {
 public:
  explicit Hand(std::uint64_t features = kIndirect) : rig(kSize, features) {}

  // One buffer of `len` bytes at `gpa`, filled with a pattern unique to `tag`.
  struct Buf {
    std::uint64_t gpa;
    std::uint32_t len;
    bool write;
  };
  void fill(const Buf& b, std::uint8_t tag) {
    for (std::uint32_t i = 0; i < b.len; ++i) {
      rig.host(b.gpa)[i] = static_cast<std::uint8_t>(tag * 31 + i * 7);
    }
  }
  static VirtqDesc desc(const Buf& b, std::uint16_t flags, std::uint16_t next = 0) {
    return VirtqDesc{b.gpa, b.len, static_cast<std::uint16_t>(flags | (b.write ? kDescFWrite : 0)),
                     next};
  }
  VirtqDesc* ring_desc() { return rig.driver.desc(); }
  VirtqDesc* table(std::uint64_t gpa = kTableGpa) {
    return reinterpret_cast<VirtqDesc*>(rig.host(gpa));
  }
  void publish(std::uint16_t head) {
    virtio::VirtqAvail* a = rig.driver.avail();
    a->ring[avail_idx_ % kSize] = head;
    ++avail_idx_;
    std::atomic_ref<std::uint16_t>(a->idx).store(avail_idx_, std::memory_order_release);
  }
  // The used element the device queued last (published first).
  virtio::VirtqUsedElem last_used() {
    rig.device.publish_used();
    return rig.driver.used()->ring[(rig.device.used_idx() - 1) & (kSize - 1)];
  }

  Rig rig;

 private:
  std::uint16_t avail_idx_ = 0;
};

// The bytes behind a list of iovecs, in order.
std::vector<std::uint8_t> bytes_of(std::span<const iovec> v) {
  std::vector<std::uint8_t> out;
  for (const iovec& s : v) {
    const auto* p = static_cast<const std::uint8_t*>(s.iov_base);
    out.insert(out.end(), p, p + s.iov_len);
  }
  return out;
}

std::vector<std::uint8_t> expected(Rig& rig, std::initializer_list<Hand::Buf> bufs) {
  std::vector<std::uint8_t> out;
  for (const auto& b : bufs) out.insert(out.end(), rig.host(b.gpa), rig.host(b.gpa) + b.len);
  return out;
}

// After a refused chain: it was answered {head, 0}, counted once, the queue is not broken, and
// a plain chain published next is served.
void expect_refused_then_serving(Hand& h, std::uint16_t head, ChainError want) {
  std::array<iovec, 16> segs{};
  auto c = h.rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), want) << to_string(c.error());
  EXPECT_EQ(h.rig.errors(want), 1u);
  EXPECT_FALSE(h.rig.device.broken());
  const auto u = h.last_used();
  EXPECT_EQ(u.id, head);
  EXPECT_EQ(u.len, 0u);
  const Hand::Buf good{Rig::kDataGpa + 0x7000, 40, false};
  h.fill(good, 99);
  h.ring_desc()[7] = Hand::desc(good, 0);
  h.publish(7);
  auto next = h.rig.device.pop(segs);
  ASSERT_TRUE(next.has_value()) << to_string(next.error());
  EXPECT_EQ(next->head, 7);
  EXPECT_EQ(bytes_of(next->readable), expected(h.rig, {good}));
}

// Two direct readable buffers, then a descriptor pointing at a table of one readable and two
// writable buffers: one chain of three readable and two writable pieces, in chain order.
TEST(VirtqChainShape, DirectChainEndingInIndirectIsServed) {
  Hand h;
  const Hand::Buf r0{Rig::kDataGpa, 16, false}, r1{Rig::kDataGpa + 0x100, 100, false};
  const Hand::Buf t0{Rig::kDataGpa + 0x200, 300, false}, t1{Rig::kDataGpa + 0x400, 64, true},
      t2{Rig::kDataGpa + 0x500, 1, true};
  std::uint8_t tag = 1;
  for (const auto& b : {r0, r1, t0, t1, t2}) h.fill(b, tag++);
  h.table()[0] = Hand::desc(t0, kDescFNext, 1);
  h.table()[1] = Hand::desc(t1, kDescFNext, 2);
  h.table()[2] = Hand::desc(t2, 0);
  // Ring descriptors 3 -> 5 -> 2 (not in index order), 2 holding the table.
  h.ring_desc()[3] = Hand::desc(r0, kDescFNext, 5);
  h.ring_desc()[5] = Hand::desc(r1, kDescFNext, 2);
  h.ring_desc()[2] = VirtqDesc{kTableGpa, 3 * 16, kDescFIndirect, 0};
  h.publish(3);

  std::array<iovec, 16> segs{};
  auto c = h.rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->head, 3);
  EXPECT_EQ(c->desc_count, 6);  // two direct, the table pointer, three in the table
  ASSERT_EQ(c->readable.size(), 3u);
  ASSERT_EQ(c->writable.size(), 2u);
  EXPECT_EQ(c->readable_len, 16u + 100 + 300);
  EXPECT_EQ(c->writable_len, 65u);
  EXPECT_EQ(c->readable[0].iov_base, h.rig.host(r0.gpa));
  EXPECT_EQ(c->readable[2].iov_base, h.rig.host(t0.gpa));
  EXPECT_EQ(c->writable[0].iov_base, h.rig.host(t1.gpa));
  EXPECT_EQ(c->writable[1].iov_base, h.rig.host(t2.gpa));
  EXPECT_EQ(bytes_of(c->readable), expected(h.rig, {r0, r1, t0}));
  EXPECT_EQ(bytes_of(c->writable), expected(h.rig, {t1, t2}));
  EXPECT_EQ(h.rig.device.errors(), (std::array<std::uint64_t, kChainErrorCount>{}));
}

// The same shape with VIRTQ_DESC_F_WRITE on the pointer descriptor: the device ignores it, so
// the table's readable buffers are not "readable after writable".
TEST(VirtqChainShape, WriteFlagOnTheTablePointerIsIgnored) {
  Hand h;
  const Hand::Buf r0{Rig::kDataGpa, 12, false};
  const Hand::Buf t0{Rig::kDataGpa + 0x100, 50, false}, t1{Rig::kDataGpa + 0x200, 70, true};
  h.fill(r0, 1);
  h.fill(t0, 2);
  h.fill(t1, 3);
  h.table()[0] = Hand::desc(t0, kDescFNext, 1);
  h.table()[1] = Hand::desc(t1, 0);
  h.ring_desc()[0] = Hand::desc(r0, kDescFNext, 1);
  h.ring_desc()[1] = VirtqDesc{kTableGpa, 2 * 16, kDescFIndirect | kDescFWrite, 0};
  h.publish(0);
  std::array<iovec, 8> segs{};
  auto c = h.rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(bytes_of(c->readable), expected(h.rig, {r0, t0}));
  EXPECT_EQ(bytes_of(c->writable), expected(h.rig, {t1}));
  EXPECT_EQ(c->readable_len, 62u);
  EXPECT_EQ(c->writable_len, 70u);
}

// A writable direct buffer followed by a table of writable buffers is one writable run.
TEST(VirtqChainShape, WritableDirectThenWritableTable) {
  Hand h;
  const Hand::Buf r0{Rig::kDataGpa, 16, false}, w0{Rig::kDataGpa + 0x100, 200, true};
  const Hand::Buf t0{Rig::kDataGpa + 0x300, 300, true}, t1{Rig::kDataGpa + 0x500, 1, true};
  std::uint8_t tag = 1;
  for (const auto& b : {r0, w0, t0, t1}) h.fill(b, tag++);
  h.table()[0] = Hand::desc(t0, kDescFNext, 1);
  h.table()[1] = Hand::desc(t1, 0);
  h.ring_desc()[4] = Hand::desc(r0, kDescFNext, 6);
  h.ring_desc()[6] = Hand::desc(w0, kDescFNext, 0);
  h.ring_desc()[0] = VirtqDesc{kTableGpa, 2 * 16, kDescFIndirect, 0};
  h.publish(4);
  std::array<iovec, 8> segs{};
  auto c = h.rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(bytes_of(c->readable), expected(h.rig, {r0}));
  EXPECT_EQ(bytes_of(c->writable), expected(h.rig, {w0, t0, t1}));
  EXPECT_EQ(c->writable_len, 501u);
}

// A direct buffer that spans the two adjacent regions, then a table: the walker splits the
// direct buffer into two pieces and still appends the table's buffers after them.
TEST(VirtqChainShape, DirectBufferAcrossRegionsThenIndirect) {
  Hand h;
  const Hand::Buf r0{Rig::kGpaB - 40, 100, false};  // 40 bytes in A, 60 in B
  const Hand::Buf t0{Rig::kGpaB + 0x1000, 33, true};
  h.fill(r0, 5);
  h.fill(t0, 6);
  h.table()[0] = Hand::desc(t0, 0);
  h.ring_desc()[1] = Hand::desc(r0, kDescFNext, 2);
  h.ring_desc()[2] = VirtqDesc{kTableGpa, 16, kDescFIndirect, 0};
  h.publish(1);
  std::array<iovec, 8> segs{};
  auto c = h.rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  ASSERT_EQ(c->readable.size(), 2u);
  EXPECT_EQ(c->readable[0].iov_len, 40u);
  EXPECT_EQ(c->readable[1].iov_len, 60u);
  EXPECT_EQ(c->readable[1].iov_base, h.rig.host(Rig::kGpaB));
  EXPECT_EQ(bytes_of(c->readable), expected(h.rig, {r0}));
  EXPECT_EQ(bytes_of(c->writable), expected(h.rig, {t0}));
}

// k direct buffers plus m in the table, k + m == queue size: served; one more: too long.
TEST(VirtqChainShape, DirectAndIndirectBuffersTogetherBoundedByQueueSize) {
  for (const std::uint16_t in_table : {5, 6}) {
    Hand h;
    for (std::uint16_t i = 0; i < in_table; ++i) {
      const Hand::Buf b{Rig::kDataGpa + 0x100u * i, 8, false};
      h.fill(b, static_cast<std::uint8_t>(i));
      h.table()[i] = Hand::desc(b, i + 1 < in_table ? kDescFNext : 0, i + 1);
    }
    for (std::uint16_t i = 0; i < 3; ++i) {
      const Hand::Buf b{Rig::kDataGpa + 0x1000 + 0x100u * i, 8, false};
      h.ring_desc()[i] = Hand::desc(b, kDescFNext, i + 1);
    }
    h.ring_desc()[3] = VirtqDesc{kTableGpa, in_table * 16u, kDescFIndirect, 0};
    h.publish(0);
    if (3 + in_table <= kSize) {
      std::array<iovec, 16> segs{};
      auto c = h.rig.device.pop(segs);
      ASSERT_TRUE(c.has_value()) << to_string(c.error());
      EXPECT_EQ(c->readable.size(), 8u);
      EXPECT_EQ(c->readable_len, 64u);
    } else {
      expect_refused_then_serving(h, 0, ChainError::chain_too_long);
    }
  }
}

// ---- shapes that stay malformed -------------------------------------------------------------

// INDIRECT with NEXT in the middle of a direct chain (2.7.5.3.1: a driver MUST NOT set both).
TEST(VirtqChainShape, IndirectWithNextInsideADirectChainIsRefused) {
  Hand h;
  const Hand::Buf r0{Rig::kDataGpa, 16, false}, r1{Rig::kDataGpa + 0x100, 16, false};
  const Hand::Buf t0{Rig::kDataGpa + 0x200, 16, false};
  h.table()[0] = Hand::desc(t0, 0);
  h.ring_desc()[0] = Hand::desc(r0, kDescFNext, 1);
  h.ring_desc()[1] = VirtqDesc{kTableGpa, 16, kDescFIndirect | kDescFNext, 2};
  h.ring_desc()[2] = Hand::desc(r1, 0);
  h.publish(0);
  expect_refused_then_serving(h, 0, ChainError::indirect_with_next);
}

// A writable direct buffer, then a table whose first buffer is readable.
TEST(VirtqChainShape, ReadableTableAfterWritableDirectIsRefused) {
  Hand h;
  const Hand::Buf w0{Rig::kDataGpa, 16, true}, t0{Rig::kDataGpa + 0x200, 16, false};
  h.table()[0] = Hand::desc(t0, 0);
  h.ring_desc()[5] = Hand::desc(w0, kDescFNext, 6);
  h.ring_desc()[6] = VirtqDesc{kTableGpa, 16, kDescFIndirect, 0};
  h.publish(5);
  expect_refused_then_serving(h, 5, ChainError::readable_after_writable);
}

// A table reached through a direct prefix may not point at another table.
TEST(VirtqChainShape, NestedTableAfterDirectPrefixIsRefused) {
  Hand h;
  const Hand::Buf r0{Rig::kDataGpa, 16, false}, t0{Rig::kDataGpa + 0x200, 16, false};
  h.table()[0] = Hand::desc(t0, kDescFNext, 1);
  h.table()[1] = VirtqDesc{kTableGpa, 32, kDescFIndirect, 0};
  h.ring_desc()[0] = Hand::desc(r0, kDescFNext, 1);
  h.ring_desc()[1] = VirtqDesc{kTableGpa, 32, kDescFIndirect, 0};
  h.publish(0);
  expect_refused_then_serving(h, 0, ChainError::indirect_nested);
}

// The same prefix-then-table chain on a device that did not negotiate INDIRECT_DESC.
TEST(VirtqChainShape, DirectThenIndirectWithoutTheFeatureIsRefused) {
  Hand h(0);
  const Hand::Buf r0{Rig::kDataGpa, 16, false}, t0{Rig::kDataGpa + 0x200, 16, false};
  h.table()[0] = Hand::desc(t0, 0);
  h.ring_desc()[0] = Hand::desc(r0, kDescFNext, 1);
  h.ring_desc()[1] = VirtqDesc{kTableGpa, 16, kDescFIndirect, 0};
  h.publish(0);
  expect_refused_then_serving(h, 0, ChainError::indirect_not_negotiated);
}

}  // namespace
}  // namespace vhostkit::virtq
