// vhost::InflightRegion: the spec's layout, the data-path marks, recovery after a restart.
// The region is read back through a second mapping of its fd at the spec's byte offsets, the
// way the front-end and the next back-end see it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "vhostkit/vhost/inflight.h"

namespace vhostkit::vhost {
namespace {

constexpr auto kSplit = InflightLayout::split;

// The spec's byte offsets, written out rather than taken from our structs.
constexpr std::uint64_t kFeatures = 0, kVersion = 8, kDescNum = 10, kLastBatchHead = 12,
                        kUsedIdx = 14, kDescs = 16, kDescSize = 16;
constexpr std::uint64_t kInflight = 0, kNext = 6, kCounter = 8;

// A second mapping of a region's fd: what another process sees.
class View {
 public:
  View(int fd, std::uint64_t size, std::uint64_t offset, std::uint32_t queue_size)
      : len_(offset + size), offset_(offset), queue_size_(queue_size) {
    p_ = static_cast<std::uint8_t*>(
        ::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    EXPECT_NE(p_, MAP_FAILED);
  }
  ~View() { ::munmap(p_, len_); }
  std::uint8_t* queue(std::uint32_t q) const {
    return p_ + offset_ + q * inflight_queue_bytes(kSplit, queue_size_);
  }
  template <typename T>
  T get(std::uint32_t q, std::uint64_t off) const {
    T v;
    std::memcpy(&v, queue(q) + off, sizeof v);
    return v;
  }
  template <typename T>
  void set(std::uint32_t q, std::uint64_t off, T v) const {
    std::memcpy(queue(q) + off, &v, sizeof v);
  }
  std::uint16_t version(std::uint32_t q) const { return get<std::uint16_t>(q, kVersion); }
  std::uint16_t used_idx(std::uint32_t q) const { return get<std::uint16_t>(q, kUsedIdx); }
  std::uint16_t last_batch_head(std::uint32_t q) const {
    return get<std::uint16_t>(q, kLastBatchHead);
  }
  std::uint8_t inflight(std::uint32_t q, std::uint16_t h) const {
    return get<std::uint8_t>(q, kDescs + h * kDescSize + kInflight);
  }
  std::uint16_t next(std::uint32_t q, std::uint16_t h) const {
    return get<std::uint16_t>(q, kDescs + h * kDescSize + kNext);
  }
  std::uint64_t counter(std::uint32_t q, std::uint16_t h) const {
    return get<std::uint64_t>(q, kDescs + h * kDescSize + kCounter);
  }

 private:
  std::uint8_t* p_;
  std::uint64_t len_, offset_;
  std::uint32_t queue_size_;
};

InflightRegion must_allocate(std::uint32_t queues, std::uint32_t size) {
  auto r = InflightRegion::allocate(kSplit, queues, size);
  EXPECT_TRUE(r.has_value()) << r.error().message();
  return std::move(*r);
}

// What a restarted back-end does with the fd the front-end kept.
InflightRegion must_reattach(const InflightRegion& old) {
  auto r = InflightRegion::attach(UniqueFd(::dup(old.fd())), old.mmap_size(), old.mmap_offset(),
                                  kSplit, old.num_queues(), old.queue_size());
  EXPECT_TRUE(r.has_value()) << r.error().message();
  return std::move(*r);
}

InflightRecovery must_recover(InflightSplitQueue& q, std::uint16_t used, std::uint32_t ring) {
  auto r = q.recover(used, ring);
  EXPECT_TRUE(r.has_value()) << r.error().message();
  return r.value_or(InflightRecovery{});
}

// A device's side of one ring: answers heads in batches and publishes the used idx.
struct Ring {
  InflightSplitQueue& q;
  std::uint16_t used_idx = 0;
  void answer(std::initializer_list<std::uint16_t> heads) {
    for (std::uint16_t h : heads) q.used(h);
    used_idx = static_cast<std::uint16_t>(used_idx + heads.size());
    q.published(used_idx);
  }
};

using Heads = std::vector<std::uint16_t>;

// ---- layout ----------------------------------------------------------------------------------

TEST(InflightLayoutTest, QueueRegionMatchesLibvhostUserAndDpdkForEverySize) {
  for (std::uint32_t n = 1; n <= kInflightMaxQueueSize; n *= 2) {
    const std::uint64_t ours = inflight_queue_bytes(kSplit, n);
    // libvhost-user: ALIGN_UP(16 * n + 2, 64); DPDK: ALIGN(16 * n + 8 + 4 * 2, 64).
    EXPECT_EQ(ours, (16ull * n + 2 + 63) / 64 * 64) << n;
    EXPECT_EQ(ours, (16ull * n + 16 + 63) / 64 * 64) << n;
    EXPECT_EQ(ours % 64, 0u);
    EXPECT_GE(ours, 16ull + 16ull * n);
  }
  EXPECT_EQ(inflight_queue_bytes(kSplit, 128), 2112u);
  EXPECT_EQ(inflight_queue_bytes(kSplit, 256), 4160u);
}

TEST(InflightLayoutTest, RegionSizeAndShapeRules) {
  EXPECT_EQ(inflight_size(kSplit, 2, 128).value(), 2u * 2112u);
  EXPECT_EQ(inflight_size(kSplit, kInflightMaxQueues, kInflightMaxQueueSize).value(),
            1024ull * (16 + 16 * 32768ull + 48));
  for (auto [queues, size] : {std::pair{0u, 128u},
                              {1025u, 128u},
                              {65535u, 128u},
                              {1u, 0u},
                              {1u, 100u},
                              {1u, 65536u},
                              {1u, 0xffffffffu}}) {
    auto r = inflight_size(kSplit, queues, size);
    ASSERT_FALSE(r.has_value()) << queues << " x " << size;
    EXPECT_EQ(r.error().code, Errc::out_of_range);
  }
}

TEST(InflightLayoutTest, AllocateGivesASealedZeroedMemfdOfTheSize) {
  InflightRegion r = must_allocate(3, 64);
  EXPECT_EQ(r.mmap_size(), 3 * inflight_queue_bytes(kSplit, 64));
  EXPECT_EQ(r.mmap_offset(), 0u);
  EXPECT_EQ(r.num_queues(), 3);
  EXPECT_EQ(r.queue_size(), 64);
  struct stat st{};
  ASSERT_EQ(::fstat(r.fd(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), r.mmap_size());
  const int seals = ::fcntl(r.fd(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_NE(::ftruncate(r.fd(), 0), 0) << "the front-end keeps the fd: it must not shrink";
  View v(r.fd(), r.mmap_size(), 0, 64);
  for (std::uint32_t q = 0; q < 3; ++q) EXPECT_EQ(v.version(q), 0) << "spec: 0 = not set up";
  EXPECT_NE(r.split_queue(2), nullptr);
  EXPECT_EQ(r.split_queue(3), nullptr);
}

TEST(InflightLayoutTest, EveryFieldLandsAtTheSpecsOffsetInItsQueue) {
  InflightRegion r = must_allocate(2, 16);
  View v(r.fd(), r.mmap_size(), 0, 16);
  InflightSplitQueue& q1 = *r.split_queue(1);
  auto rec = must_recover(q1, 40, 16);
  EXPECT_TRUE(rec.initialized);
  EXPECT_EQ(v.version(1), kInflightVersion);
  EXPECT_EQ(v.get<std::uint16_t>(1, kDescNum), 16);
  EXPECT_EQ(v.get<std::uint64_t>(1, kFeatures), 0u);
  EXPECT_EQ(v.used_idx(1), 40);
  EXPECT_EQ(v.version(0), 0) << "queue 0 is untouched";

  q1.submit(9);
  q1.submit(4);
  EXPECT_EQ(v.inflight(1, 9), 1);
  EXPECT_EQ(v.counter(1, 9), 0u);
  EXPECT_EQ(v.inflight(1, 4), 1);
  EXPECT_EQ(v.counter(1, 4), 1u);
  q1.used(9);
  q1.used(4);
  EXPECT_EQ(v.last_batch_head(1), 4);
  EXPECT_EQ(v.next(1, 4), 9) << "the batch list runs from the last head pushed";
  EXPECT_EQ(v.inflight(1, 9), 1) << "still marked until the used idx is published";
  q1.published(42);
  EXPECT_EQ(v.inflight(1, 9), 0);
  EXPECT_EQ(v.inflight(1, 4), 0);
  EXPECT_EQ(v.used_idx(1), 42);
  EXPECT_EQ(q1.misuse(), 0u);
  for (std::uint64_t off = 0; off < inflight_queue_bytes(kSplit, 16); ++off) {
    EXPECT_EQ(v.get<std::uint8_t>(0, off), 0) << "queue 0's bytes, offset " << off;
  }
}

// ---- the data path ---------------------------------------------------------------------------

TEST(InflightQueueTest, SubmitAndAnswerRoundTripLeavesNothingInFlight) {
  InflightRegion r = must_allocate(1, 256);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 65000, 256);
  Ring ring{q, 65000};
  for (int round = 0; round < 300; ++round) {  // the used idx wraps on the way
    for (std::uint16_t h = 0; h < 256; h += 32)
      q.submit(static_cast<std::uint16_t>(h + round % 32));
    for (std::uint16_t h = 0; h < 256; h += 64) {
      ring.answer({static_cast<std::uint16_t>(h + round % 32),
                   static_cast<std::uint16_t>(h + 32 + round % 32)});
    }
  }
  EXPECT_EQ(q.misuse(), 0u);
  EXPECT_EQ(q.next_counter(), 300u * 8);
  InflightRegion again = must_reattach(r);
  auto rec = must_recover(*again.split_queue(0), ring.used_idx, 256);
  EXPECT_TRUE(rec.resubmit.empty());
  EXPECT_EQ(rec.batch_cleared, 0);
  EXPECT_EQ(rec.last_avail_idx, ring.used_idx);
}

TEST(InflightQueueTest, MisuseIsCountedNotTrusted) {
  InflightRegion r = must_allocate(1, 8);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 8);
  q.submit(8);
  q.used(9);
  EXPECT_EQ(q.misuse(), 2u);
  q.submit(1);
  q.used(1);
  q.published(3);  // one entry in the batch, three published
  EXPECT_EQ(q.misuse(), 3u);
  for (std::uint16_t i = 0; i < 9; ++i) q.used(static_cast<std::uint16_t>(i % 8));
  EXPECT_EQ(q.misuse(), 4u) << "a ninth used entry before a publish overflows the batch";
}

TEST(InflightQueueTest, TheDataPathWritesItsOwnStateNotWhatThePeerScribbled) {
  InflightRegion r = must_allocate(1, 16);
  View v(r.fd(), r.mmap_size(), 0, 16);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 16);
  q.submit(3);
  q.submit(4);
  q.used(3);
  v.set<std::uint16_t>(0, kLastBatchHead, 0xbeef);  // the peer, concurrently
  v.set<std::uint16_t>(0, kUsedIdx, 0x7777);
  q.used(4);
  EXPECT_EQ(v.next(0, 4), 3);
  q.published(2);
  EXPECT_EQ(v.used_idx(0), 2);
  EXPECT_EQ(v.last_batch_head(0), 4);
  EXPECT_EQ(q.misuse(), 0u);
}

// ---- recovery --------------------------------------------------------------------------------

TEST(InflightRecoveryTest, OutOfOrderCompletionsResubmitInSubmissionOrder) {
  InflightRegion r = must_allocate(1, 128);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 128);
  Ring ring{q};
  // The avail ring offered these heads in this order (head numbers are the guest's choice).
  const Heads taken = {7, 2, 5, 0, 99, 31, 64};
  for (std::uint16_t h : taken) q.submit(h);
  ring.answer({5});
  ring.answer({99, 7});
  ring.answer({64});

  InflightRegion next = must_reattach(r);  // the back-end restarted
  auto rec = must_recover(*next.split_queue(0), ring.used_idx, 128);
  EXPECT_EQ(rec.resubmit, (Heads{2, 0, 31})) << "by counter, not by head number";
  EXPECT_EQ(rec.used_idx, 4);
  EXPECT_EQ(rec.last_avail_idx, 7) << "every head taken is used or resubmitted";
  EXPECT_EQ(rec.batch_cleared, 0);
  EXPECT_FALSE(rec.initialized);
  EXPECT_EQ(next.split_queue(0)->next_counter(), 6u) << "after the last resubmitted counter";
}

TEST(InflightRecoveryTest, CrashAfterPublishBeforeClearDoesNotResubmitTheBatch) {
  InflightRegion r = must_allocate(1, 64);
  View v(r.fd(), r.mmap_size(), 0, 64);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 10, 64);
  Ring ring{q, 10};
  for (std::uint16_t h : {1, 2, 3, 4, 5}) q.submit(h);
  ring.answer({2});
  q.used(4);
  q.used(1);
  // The ring's used idx moved to 13 (two entries), then the back-end died before published().
  EXPECT_EQ(v.used_idx(0), 11);

  InflightRegion next = must_reattach(r);
  auto rec = must_recover(*next.split_queue(0), 13, 64);
  EXPECT_EQ(rec.batch_cleared, 2);
  EXPECT_EQ(rec.resubmit, (Heads{3, 5}));
  EXPECT_EQ(rec.last_avail_idx, 15);
  EXPECT_EQ(v.inflight(0, 4), 0);
  EXPECT_EQ(v.inflight(0, 1), 0);
  EXPECT_EQ(v.used_idx(0), 13) << "the region agrees with the ring again";

  // A second crash right after recovery finds a consistent region and the same answer.
  InflightRegion third = must_reattach(next);
  auto again = must_recover(*third.split_queue(0), 13, 64);
  EXPECT_EQ(again.batch_cleared, 0);
  EXPECT_EQ(again.resubmit, (Heads{3, 5}));
}

TEST(InflightRecoveryTest, CrashBeforePublishResubmitsTheWholeBatch) {
  InflightRegion r = must_allocate(1, 64);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 64);
  for (std::uint16_t h : {8, 9, 10}) q.submit(h);
  q.used(9);
  q.used(8);  // linked, but the ring's used idx never moved: the guest saw nothing

  InflightRegion next = must_reattach(r);
  auto rec = must_recover(*next.split_queue(0), 0, 64);
  EXPECT_EQ(rec.batch_cleared, 0);
  EXPECT_EQ(rec.resubmit, (Heads{8, 9, 10}));
}

TEST(InflightRecoveryTest, CrashHalfWayThroughClearingFinishesTheRest) {
  InflightRegion r = must_allocate(1, 64);
  View v(r.fd(), r.mmap_size(), 0, 64);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 64);
  for (std::uint16_t h : {20, 21, 22, 23}) q.submit(h);
  q.used(21);
  q.used(23);
  q.used(20);
  v.set<std::uint8_t>(0, kDescs + 23 * kDescSize + kInflight, 0);  // cleared one, then died

  InflightRegion next = must_reattach(r);
  auto rec = must_recover(*next.split_queue(0), 3, 64);
  EXPECT_EQ(rec.batch_cleared, 2);
  EXPECT_EQ(rec.resubmit, (Heads{22}));
}

TEST(InflightRecoveryTest, ResubmittedHeadsKeepTheirPlaceAheadOfNewOnes) {
  InflightRegion r = must_allocate(1, 32);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 32);
  for (std::uint16_t h : {3, 1, 2}) q.submit(h);

  InflightRegion b = must_reattach(r);
  InflightSplitQueue& qb = *b.split_queue(0);
  auto rec = must_recover(qb, 0, 32);
  ASSERT_EQ(rec.resubmit, (Heads{3, 1, 2}));
  qb.submit(9);  // a new head; head 1 is answered, 2, 3 and 9 are still out
  Ring ring{qb};
  ring.answer({1});

  InflightRegion c = must_reattach(b);  // and it crashed again
  auto rec2 = must_recover(*c.split_queue(0), 1, 32);
  EXPECT_EQ(rec2.resubmit, (Heads{3, 2, 9}));
  EXPECT_EQ(rec2.last_avail_idx, 4);
}

TEST(InflightRecoveryTest, TwoAttachesShareOneRegion) {
  InflightRegion a = must_allocate(2, 64);
  must_recover(*a.split_queue(0), 0, 64);
  must_recover(*a.split_queue(1), 0, 64);
  a.split_queue(1)->submit(17);

  InflightRegion b = must_reattach(a);  // while the old mapping still exists
  InflightSplitQueue& qb = *b.split_queue(1);
  auto rec = must_recover(qb, 0, 64);
  EXPECT_EQ(rec.resubmit, (Heads{17}));
  qb.submit(30);
  View v(a.fd(), a.mmap_size(), 0, 64);
  EXPECT_EQ(v.inflight(1, 30), 1) << "b writes the very bytes a mapped";
  EXPECT_EQ(v.counter(1, 30), 1u);

  a = InflightRegion(std::move(b));  // the old mapping goes; the moved queue still works
  Ring ring{*a.split_queue(1)};
  ring.answer({17, 30});
  EXPECT_EQ(v.inflight(1, 17), 0);
  EXPECT_EQ(v.used_idx(1), 2);
  auto queue0 = must_recover(*must_reattach(a).split_queue(0), 0, 64);
  EXPECT_TRUE(queue0.resubmit.empty());
}

TEST(InflightRecoveryTest, AttachAtAnOffsetInsideALargerFile) {
  const std::uint64_t offset = 4096 + 64 * 3;
  const std::uint64_t size = inflight_size(kSplit, 1, 16).value();
  UniqueFd fd(::memfd_create("inflight-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(offset + size + 4096)), 0);
  {
    View v(fd.get(), size, offset, 16);
    v.set<std::uint16_t>(0, kVersion, 1);
    v.set<std::uint16_t>(0, kDescNum, 16);
    v.set<std::uint16_t>(0, kUsedIdx, 5);
    v.set<std::uint8_t>(0, kDescs + 11 * kDescSize + kInflight, 1);
    v.set<std::uint64_t>(0, kDescs + 11 * kDescSize + kCounter, 77);
    v.set<std::uint8_t>(0, kDescs + 6 * kDescSize + kInflight, 1);
    v.set<std::uint64_t>(0, kDescs + 6 * kDescSize + kCounter, 76);
  }
  const int raw = fd.get();
  auto r = InflightRegion::attach(std::move(fd), size, offset, kSplit, 1, 16);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->fd(), raw);
  EXPECT_EQ(r->mmap_offset(), offset);
  auto rec = must_recover(*r->split_queue(0), 5, 16);
  EXPECT_EQ(rec.resubmit, (Heads{6, 11}));
  EXPECT_EQ(r->split_queue(0)->next_counter(), 78u);
}

TEST(InflightRecoveryTest, SmallerRingThanTheRegionTracks) {
  InflightRegion r = must_allocate(1, 256);
  InflightSplitQueue& q = *r.split_queue(0);
  must_recover(q, 0, 64);  // the driver chose 64 entries of the 256 the device offers
  q.submit(63);
  auto rec = must_recover(*must_reattach(r).split_queue(0), 0, 64);
  EXPECT_EQ(rec.resubmit, (Heads{63}));
}

}  // namespace
}  // namespace vhostkit::vhost
