// vhost::InflightRegion against a hostile front-end: the region and its numbers come from the
// peer. Each case ends in a clear error (naming the queue and the field) or is ignored; none
// reads or writes outside the mapping (run under ASan too), leaks the fd or a mapping, or changes
// the region when it refuses it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <limits>
#include <random>
#include <string_view>
#include <vector>

#include "testing/fd_count.h"
#include "vhostkit/vhost/inflight.h"

namespace vhostkit::vhost {
namespace {

constexpr auto kSplit = InflightLayout::split;
constexpr std::uint64_t kVersion = 8, kDescNum = 10, kLastBatchHead = 12, kUsedIdx = 14,
                        kDescs = 16, kDescSize = 16;
constexpr std::uint64_t kInflight = 0, kNext = 6, kCounter = 8;
constexpr std::string_view kMemfdName = "inflight-hostile";

// A file the peer built: `prefix` bytes, then a region of `queues` x `size` set up as a
// well-behaved back-end leaves it (version 1, desc_num), which each test then spoils.
class PeerFile {
 public:
  PeerFile(std::uint32_t queues, std::uint32_t size, std::uint64_t prefix = 0,
           std::int64_t file_delta = 0, unsigned memfd_flags = MFD_CLOEXEC | MFD_ALLOW_SEALING)
      : queues_(queues), size_(size), prefix_(prefix) {
    bytes_ = queues * inflight_queue_bytes(kSplit, size);
    fd_ = UniqueFd(::memfd_create(std::string(kMemfdName).c_str(), memfd_flags));
    file_ = static_cast<std::uint64_t>(static_cast<std::int64_t>(prefix + bytes_) + file_delta);
    EXPECT_EQ(::ftruncate(fd_.get(), static_cast<off_t>(file_)), 0);
    map_ = static_cast<std::uint8_t*>(
        ::mmap(nullptr, prefix + bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0));
    EXPECT_NE(map_, MAP_FAILED);
    for (std::uint32_t q = 0; q < queues && prefix + (q + 1) * stride() <= file_; ++q) {
      set<std::uint16_t>(q, kVersion, 1);
      set<std::uint16_t>(q, kDescNum, static_cast<std::uint16_t>(size));
    }
  }
  ~PeerFile() { ::munmap(map_, prefix_ + bytes_); }

  std::uint64_t stride() const { return inflight_queue_bytes(kSplit, size_); }
  std::uint64_t bytes() const { return bytes_; }
  template <typename T>
  void set(std::uint32_t q, std::uint64_t off, T v) {
    std::memcpy(map_ + prefix_ + q * stride() + off, &v, sizeof v);
  }
  void mark(std::uint32_t q, std::uint16_t head, std::uint64_t counter) {
    set<std::uint8_t>(q, kDescs + head * kDescSize + kInflight, 1);
    set<std::uint64_t>(q, kDescs + head * kDescSize + kCounter, counter);
  }
  std::vector<std::uint8_t> snapshot() const { return {map_ + prefix_, map_ + prefix_ + bytes_}; }
  UniqueFd dup() const { return UniqueFd(::dup(fd_.get())); }
  Result<InflightRegion> attach() const {
    return InflightRegion::attach(dup(), bytes_, prefix_, kSplit, queues_, size_);
  }

 private:
  std::uint32_t queues_, size_;
  std::uint64_t prefix_, bytes_ = 0, file_ = 0;
  UniqueFd fd_;
  std::uint8_t* map_ = nullptr;
};

template <typename T>
void expect_error(const Result<T>& r, Errc code, std::string_view needle) {
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, code) << r.error().message();
  EXPECT_NE(r.error().detail.find(needle), std::string::npos) << r.error().message();
}

class InflightHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    fds_ = vhostkit::testing::open_fd_count();
    maps_ = vhostkit::testing::mapping_count(kMemfdName);
  }
  void TearDown() override {
    EXPECT_EQ(vhostkit::testing::open_fd_count(), fds_) << "every fd handed in is closed";
    EXPECT_EQ(vhostkit::testing::mapping_count(kMemfdName), maps_) << "no mapping left behind";
  }
  // Attaches, then recovers queue q against the ring; the error of whichever refuses.
  static Result<InflightRecovery> attach_and_recover(const PeerFile& f, std::uint32_t q,
                                                     std::uint16_t used, std::uint32_t ring) {
    auto r = f.attach();
    if (!r) return std::unexpected(r.error());
    return r->split_queue(q)->recover(used, ring);
  }

 private:
  std::size_t fds_ = 0, maps_ = 0;
};

// ---- the fd, its size and the offset ---------------------------------------------------------

TEST_F(InflightHostile, NoFd) {
  expect_error(InflightRegion::attach(UniqueFd(), 2112, 0, kSplit, 1, 128), Errc::invalid_argument,
               "no fd");
}

TEST_F(InflightHostile, ShortFile) {
  PeerFile f(2, 128, 0, -1);
  expect_error(f.attach(), Errc::out_of_range, "ends past the end of the fd (0x107f bytes)");
}

TEST_F(InflightHostile, OffsetBeyondTheFile) {
  PeerFile f(1, 128);
  expect_error(InflightRegion::attach(f.dup(), f.bytes(), 4096, kSplit, 1, 128), Errc::out_of_range,
               "mmap_offset 0x1000 + mmap_size 0x840 ends past the end");
}

TEST_F(InflightHostile, OffsetPlusSizeOverflows) {
  PeerFile f(1, 128);
  const std::uint64_t top = std::numeric_limits<std::uint64_t>::max() / 64 * 64;
  expect_error(InflightRegion::attach(f.dup(), f.bytes(), top, kSplit, 1, 128), Errc::out_of_range,
               "overflows");
  const std::uint64_t off_max = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
  expect_error(InflightRegion::attach(f.dup(), f.bytes(), off_max / 64 * 64, kSplit, 1, 128),
               Errc::out_of_range, "overflows");
}

TEST_F(InflightHostile, OffsetNotAligned) {
  PeerFile f(1, 128, 4096);
  expect_error(InflightRegion::attach(f.dup(), f.bytes(), 4096 + 8, kSplit, 1, 128),
               Errc::invalid_argument, "mmap_offset 0x1008 is not a multiple of 64");
}

TEST_F(InflightHostile, SizeNotTheShapes) {
  PeerFile f(2, 128);
  for (std::uint64_t size : {std::uint64_t{0}, f.bytes() - 64, f.bytes() + 64,
                             std::numeric_limits<std::uint64_t>::max()}) {
    expect_error(InflightRegion::attach(f.dup(), size, 0, kSplit, 2, 128), Errc::invalid_argument,
                 "but 2 queues of 128 entries take 0x1080 bytes");
  }
}

TEST_F(InflightHostile, ShapeOutOfRange) {
  PeerFile f(1, 128);
  for (auto [queues, size] : {std::pair{0u, 128u},
                              {1025u, 128u},
                              {1u, 0u},
                              {1u, 96u},
                              {1u, 65536u},
                              {0xffffffffu, 0xffffffffu}}) {
    expect_error(InflightRegion::attach(f.dup(), f.bytes(), 0, kSplit, queues, size),
                 Errc::out_of_range, "inflight region: ");
  }
}

TEST_F(InflightHostile, ShapeNotMatchingTheFile) {
  PeerFile f(2, 128);  // 2 x 2112 bytes
  // Four queues, with the size that shape would take: the file is too short for it.
  expect_error(InflightRegion::attach(f.dup(), 4 * 2112, 0, kSplit, 4, 128), Errc::out_of_range,
               "ends past the end of the fd");
  // One queue of 256 (4160 bytes) in a file of 4224: fits, but the layout says desc_num 128.
  expect_error(InflightRegion::attach(f.dup(), 4160, 0, kSplit, 1, 256), Errc::invalid_argument,
               "inflight queue 0: desc_num 128, but the region has 256 entries per queue");
  // The peer's own size for its own shape, when the region was made for another.
  expect_error(InflightRegion::attach(f.dup(), f.bytes(), 0, kSplit, 1, 128),
               Errc::invalid_argument, "mmap_size 0x1080, but 1 queues of 128 entries");
}

TEST_F(InflightHostile, NotAFile) {
  for (int raw : {::eventfd(0, EFD_CLOEXEC), ::open("/dev/null", O_RDWR | O_CLOEXEC)}) {
    ASSERT_GE(raw, 0);
    expect_error(InflightRegion::attach(UniqueFd(raw), 2112, 0, kSplit, 1, 128),
                 Errc::invalid_argument, "is not a file or memfd");
  }
}

TEST_F(InflightHostile, ReadOnlyFdIsRefusedByMmap) {
  PeerFile f(1, 128);
  const UniqueFd rw = f.dup();
  UniqueFd ro(::open(("/proc/self/fd/" + std::to_string(rw.get())).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(ro.valid());
  expect_error(InflightRegion::attach(std::move(ro), f.bytes(), 0, kSplit, 1, 128), Errc::system,
               "mmap");
}

TEST_F(InflightHostile, AttachSealsTheFileAgainstShrinking) {
  PeerFile f(1, 128);
  auto r = f.attach();
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_NE(::ftruncate(f.dup().get(), 64), 0) << "a truncate would make our stores SIGBUS";
  EXPECT_EQ(errno, EPERM);
}

TEST_F(InflightHostile, AnUnsealableFdIsTakenAsItIs) {
  PeerFile f(1, 128, 0, 0, MFD_CLOEXEC);  // DPDK's regions: a memfd without sealing
  auto r = f.attach();
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->split_queue(0)->recover(0, 128).has_value());
}

// ---- the fields of a queue -------------------------------------------------------------------

TEST_F(InflightHostile, DescNumLargerThanTheQueue) {
  PeerFile f(3, 128);
  f.set<std::uint16_t>(2, kDescNum, 256);
  expect_error(f.attach(), Errc::invalid_argument,
               "inflight queue 2: desc_num 256, but the region has 128 entries per queue");
  f.set<std::uint16_t>(2, kDescNum, 0xffff);
  expect_error(f.attach(), Errc::invalid_argument, "inflight queue 2: desc_num 65535");
}

TEST_F(InflightHostile, DescNumSmallerThanTheQueue) {
  PeerFile f(1, 128);
  f.set<std::uint16_t>(0, kDescNum, 64);
  expect_error(f.attach(), Errc::invalid_argument, "inflight queue 0: desc_num 64");
}

TEST_F(InflightHostile, UnknownVersionOrFeatures) {
  PeerFile f(2, 64);
  f.set<std::uint16_t>(1, kVersion, 2);
  expect_error(f.attach(), Errc::invalid_argument, "inflight queue 1: version 2 (0 or 1 expected)");
  f.set<std::uint16_t>(1, kVersion, 1);
  f.set<std::uint64_t>(1, 0, 1);
  expect_error(f.attach(), Errc::unsupported, "inflight queue 1: features 0x1");
}

TEST_F(InflightHostile, GarbageInflightByte) {
  PeerFile f(1, 64);
  f.set<std::uint8_t>(0, kDescs + 5 * kDescSize + kInflight, 0x80);
  expect_error(f.attach(), Errc::invalid_argument, "inflight queue 0: desc[5].inflight is 0x80");
}

TEST_F(InflightHostile, NextOrLastBatchHeadOutOfRange) {
  PeerFile f(1, 64);
  f.set<std::uint16_t>(0, kDescs + 63 * kDescSize + kNext, 64);
  expect_error(f.attach(), Errc::out_of_range, "inflight queue 0: desc[63].next 64 out of range");
  f.set<std::uint16_t>(0, kDescs + 63 * kDescSize + kNext, 0);
  f.set<std::uint16_t>(0, kLastBatchHead, 0xffff);
  expect_error(f.attach(), Errc::out_of_range, "inflight queue 0: last_batch_head 65535");
}

TEST_F(InflightHostile, CounterCollision) {
  PeerFile f(1, 64);
  f.mark(0, 3, 10);
  f.mark(0, 40, 9);
  f.mark(0, 17, 10);
  const auto before = f.snapshot();
  expect_error(attach_and_recover(f, 0, 0, 64), Errc::invalid_argument,
               "inflight queue 0: heads 3 and 17 share counter 10");
  EXPECT_EQ(f.snapshot(), before) << "a refused region is left as it was";
}

// Counters at the top of their range are renumbered to their rank, in order: new requests get
// later ones, and the next restart recovers them all (the fuzzer found a session that gave out
// the last counter and then had its own region refused).
TEST_F(InflightHostile, CountersAtTheirLimitAreRenumberedInOrder) {
  PeerFile f(1, 64);
  f.mark(0, 3, std::numeric_limits<std::uint64_t>::max());
  f.mark(0, 9, std::numeric_limits<std::uint64_t>::max() - 1);
  f.mark(0, 5, 7);
  auto r = attach_and_recover(f, 0, 0, 64);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->resubmit, (std::vector<std::uint16_t>{5, 9, 3}));
  // And again from the renumbered region: the same heads, the same order.
  auto again = attach_and_recover(f, 0, 0, 64);
  ASSERT_TRUE(again.has_value()) << again.error().message();
  EXPECT_EQ(again->resubmit, (std::vector<std::uint16_t>{5, 9, 3}));
}

TEST_F(InflightHostile, GarbageCountersOnHeadsNotInFlightAreIgnored) {
  PeerFile f(1, 64);
  for (std::uint16_t h = 0; h < 64; ++h) {
    f.set<std::uint64_t>(0, kDescs + h * kDescSize + kCounter, 7);  // all equal, none in flight
  }
  f.mark(0, 9, 1000);
  auto r = attach_and_recover(f, 0, 0, 64);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->resubmit, std::vector<std::uint16_t>{9});
}

// ---- the queue against its ring --------------------------------------------------------------

TEST_F(InflightHostile, RingSizeZeroOrLargerThanTheRegion) {
  PeerFile f(1, 64);
  expect_error(attach_and_recover(f, 0, 0, 0), Errc::out_of_range,
               "inflight queue 0: ring size 0, but the region tracks 64 entries");
  expect_error(attach_and_recover(f, 0, 0, 128), Errc::out_of_range, "ring size 128");
}

TEST_F(InflightHostile, BatchLargerThanTheRing) {
  PeerFile f(1, 128);
  f.set<std::uint16_t>(0, kUsedIdx, 65500);
  expect_error(attach_and_recover(f, 0, 100, 128), Errc::out_of_range,
               "inflight queue 0: used_idx 65500 but the ring's used idx is 100: a batch of 136 "
               "on a ring of 128");
}

TEST_F(InflightHostile, BatchListLeavesTheRing) {
  PeerFile f(1, 128);
  f.set<std::uint16_t>(0, kLastBatchHead, 100);  // fine for the region, not for a ring of 64
  expect_error(attach_and_recover(f, 0, 1, 64), Errc::out_of_range,
               "inflight queue 0: the last batch lists head 100 (ring size 64)");
}

TEST_F(InflightHostile, InFlightHeadBeyondTheRing) {
  PeerFile f(1, 128);
  f.mark(0, 64, 1);
  expect_error(attach_and_recover(f, 0, 0, 64), Errc::out_of_range,
               "inflight queue 0: desc[64] is in flight but the ring has 64 entries");
}

TEST_F(InflightHostile, BatchListInACircleClearsEachHeadOnce) {
  PeerFile f(1, 32);
  for (std::uint16_t h : {4, 5, 6}) f.mark(0, h, h);
  f.set<std::uint16_t>(0, kLastBatchHead, 4);
  f.set<std::uint16_t>(0, kDescs + 4 * kDescSize + kNext, 4);  // 4 -> 4 -> 4
  auto r = attach_and_recover(f, 0, 3, 32);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->batch_cleared, 1);
  EXPECT_EQ(r->resubmit, (std::vector<std::uint16_t>{5, 6})) << "resubmitted, never lost";
}

TEST_F(InflightHostile, ThePeerSpoilsTheRegionAfterAttach) {
  PeerFile f(1, 64);
  auto r = f.attach();
  ASSERT_TRUE(r.has_value()) << r.error().message();
  f.set<std::uint8_t>(0, kDescs + 2 * kDescSize + kInflight, 2);
  expect_error(r->split_queue(0)->recover(0, 64), Errc::invalid_argument,
               "inflight queue 0: desc[2].inflight is 0x2");
}

TEST_F(InflightHostile, GarbageInANeverSetUpQueueIsCleared) {
  PeerFile f(1, 32);
  f.set<std::uint16_t>(0, kVersion, 0);
  f.set<std::uint16_t>(0, kDescNum, 999);
  for (std::uint16_t h = 0; h < 32; ++h) {
    f.set<std::uint8_t>(0, kDescs + h * kDescSize + kInflight, 0xee);
  }
  auto r = attach_and_recover(f, 0, 0, 32);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->initialized);
  EXPECT_TRUE(r->resubmit.empty());
  auto again = attach_and_recover(f, 0, 0, 32);
  ASSERT_TRUE(again.has_value()) << again.error().message();
  EXPECT_TRUE(again->resubmit.empty()) << "version 0 means nothing was in flight";
}

// Random regions: whatever the bytes, attach and recover answer, and what recover returns is
// in range, distinct and in counter order.
TEST_F(InflightHostile, RandomRegions) {
  std::mt19937_64 rng(15);
  int accepted = 0, refused = 0;
  for (int round = 0; round < 400; ++round) {
    const std::uint32_t size = 1u << (rng() % 7);
    const std::uint32_t ring = std::max<std::uint32_t>(1, size >> (rng() % 2));
    const std::uint32_t queues = 1 + rng() % 3;
    PeerFile f(queues, size);
    for (std::uint32_t q = 0; q < queues; ++q) {
      for (std::uint16_t h = 0; h < size; ++h) {
        const auto x = rng();
        if (x % 3 == 0) f.mark(q, h, (x >> 8) % (64 * size));
        if (x % 7 == 0) f.set<std::uint16_t>(q, kDescs + h * kDescSize + kNext, (x >> 16) % size);
        if (x % 97 == 0) f.set<std::uint8_t>(q, kDescs + h * kDescSize + kInflight, x >> 24);
      }
      const auto u = rng();
      f.set<std::uint16_t>(q, kUsedIdx, static_cast<std::uint16_t>(u % 5 == 0 ? u >> 8 : u % 8));
      f.set<std::uint16_t>(q, kLastBatchHead, static_cast<std::uint16_t>(rng() % size));
      if (rng() % 11 == 0) f.set<std::uint16_t>(q, kVersion, static_cast<std::uint16_t>(rng()));
    }
    auto region = f.attach();
    if (!region) continue;
    for (std::uint32_t q = 0; q < region->num_queues(); ++q) {
      auto rec = region->split_queue(q)->recover(static_cast<std::uint16_t>(rng() % 8), ring);
      ++(rec ? accepted : refused);
      if (!rec) continue;
      std::vector<bool> seen(ring);
      for (std::uint16_t h : rec->resubmit) {
        ASSERT_LT(h, ring);
        ASSERT_FALSE(seen[h]);
        seen[h] = true;
      }
      ASSERT_LE(rec->resubmit.size(), ring);
    }
  }
  EXPECT_GT(accepted, 50) << "the random regions exercise recovery, not only its refusals";
  EXPECT_GT(refused, 50);
}

}  // namespace
}  // namespace vhostkit::vhost
