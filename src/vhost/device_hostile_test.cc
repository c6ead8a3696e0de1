// vhost::Device against a hostile frontend: every validation rule, one test each.
#include <gtest/gtest.h>

#include "testing/fd_count.h"
#include "testing/memfd.h"
#include "testing/vhost_rig.h"
#include "vhostkit/vhost/device.h"

namespace vhostkit::vhost {
namespace {

using testing::EchoBackend;
using testing::kEchoFeatures;
using testing::Rig;

class Hostile : public ::testing::Test {
 protected:
  Hostile() : dev(be, DeviceOptions{}) {}
  void SetUp() override {
    ASSERT_TRUE(dev.set_owner().has_value());
    ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
    ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
    rig.init_driver(0);
  }
  static void expect_error(const Result<>& r, Errc code, std::string_view needle = {}) {
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, code) << r.error().message();
    if (!needle.empty()) {
      EXPECT_NE(r.error().detail.find(needle), std::string::npos) << r.error().message();
    }
  }
  EchoBackend be{2};
  Device dev;
  Rig rig;
};

// --- index out of range, for every vring operation ------------------------------------------

TEST_F(Hostile, SetVringNumIndexOutOfRange) {
  expect_error(dev.set_vring_num(2, 256), Errc::out_of_range, "index 2 out of range (device has 2");
}
TEST_F(Hostile, SetVringAddrIndexOutOfRange) {
  expect_error(dev.set_vring_addr(7, rig.addr(0)), Errc::out_of_range, "index 7");
}
TEST_F(Hostile, SetVringBaseIndexOutOfRange) {
  expect_error(dev.set_vring_base(0xffffffff, 0), Errc::out_of_range, "index 4294967295");
}
TEST_F(Hostile, GetVringBaseIndexOutOfRange) {
  auto r = dev.get_vring_base(2);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::out_of_range);
}
TEST_F(Hostile, SetVringKickIndexOutOfRange) {
  auto fd = testing::make_eventfd();
  const std::size_t fds = vhostkit::testing::open_fd_count();
  expect_error(dev.set_vring_kick(2, std::move(fd)), Errc::out_of_range, "index 2");
  EXPECT_EQ(vhostkit::testing::open_fd_count(), fds - 1) << "the refused fd is closed, not leaked";
}
TEST_F(Hostile, SetVringCallIndexOutOfRange) {
  expect_error(dev.set_vring_call(2, testing::make_eventfd()), Errc::out_of_range, "index 2");
}
TEST_F(Hostile, SetVringErrIndexOutOfRange) {
  expect_error(dev.set_vring_err(3, testing::make_eventfd()), Errc::out_of_range, "index 3");
}
TEST_F(Hostile, SetVringEnableIndexOutOfRange) {
  expect_error(dev.set_vring_enable(2, true), Errc::out_of_range, "index 2");
}

// --- ring sizes ------------------------------------------------------------------------------

TEST_F(Hostile, RingSizeZero) { expect_error(dev.set_vring_num(0, 0), Errc::invalid_argument); }
TEST_F(Hostile, RingSizeNotPowerOfTwo) {
  expect_error(dev.set_vring_num(0, 3), Errc::invalid_argument, "size 3");
}
TEST_F(Hostile, RingSizeTooLarge) {
  expect_error(dev.set_vring_num(0, 65536), Errc::invalid_argument, "size 65536");
}
TEST_F(Hostile, RingSizeMaximumAccepted) { EXPECT_TRUE(dev.set_vring_num(0, 32768).has_value()); }

// --- ring addresses --------------------------------------------------------------------------

TEST_F(Hostile, DescAddressNotMapped) {
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  memory::VringAddr a = rig.addr(0);
  a.desc_user_addr = 0x10000;  // nobody's memory
  expect_error(dev.set_vring_addr(0, a), Errc::not_mapped, "desc table");
}
TEST_F(Hostile, UsedAddressNotMapped) {
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  memory::VringAddr a = rig.addr(0);
  a.used_user_addr = rig.uva(Rig::kMemSize) + 0x1000;
  expect_error(dev.set_vring_addr(0, a), Errc::not_mapped, "used ring");
}
TEST_F(Hostile, DescMisaligned) {
  memory::VringAddr a = rig.addr(0);
  a.desc_user_addr += 8;
  expect_error(dev.set_vring_addr(0, a), Errc::invalid_argument, "16-byte aligned");
}
TEST_F(Hostile, AvailMisaligned) {
  memory::VringAddr a = rig.addr(0);
  a.avail_user_addr += 1;
  expect_error(dev.set_vring_addr(0, a), Errc::invalid_argument, "2-byte aligned");
}
TEST_F(Hostile, UsedMisaligned) {
  memory::VringAddr a = rig.addr(0);
  a.used_user_addr += 2;
  expect_error(dev.set_vring_addr(0, a), Errc::invalid_argument, "4-byte aligned");
}
TEST_F(Hostile, RingStraddlesEndOfRegion) {
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  memory::VringAddr a = rig.addr(0);
  // The desc table starts inside memory, but its 4 KiB run past the region's end.
  a.desc_user_addr = rig.uva(Rig::kMemSize - 2048);
  expect_error(dev.set_vring_addr(0, a), Errc::not_mapped, "desc table");
}
TEST_F(Hostile, AddressCheckedAtStartWhenSizeCameLater) {
  memory::VringAddr a = rig.addr(0);
  a.used_user_addr = rig.uva(Rig::kMemSize - 1024);   // fits 16 entries, not 256
  ASSERT_TRUE(dev.set_vring_addr(0, a).has_value());  // size unknown yet: deferred
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  ASSERT_TRUE(dev.set_vring_kick(0, testing::make_eventfd()).has_value());
  expect_error(dev.set_vring_enable(0, true), Errc::not_mapped, "used ring");
  EXPECT_FALSE(dev.queue(0).started());
}

// --- features ----------------------------------------------------------------------------------

TEST_F(Hostile, FeaturesNotOffered) {
  const std::uint64_t extra = virtio::bit(40) | virtio::bit(3);
  expect_error(dev.set_features(kEchoFeatures | extra), Errc::unsupported, "bit 3,40");
  EXPECT_EQ(dev.features(), kEchoFeatures);
}
TEST_F(Hostile, FeaturesChangedWhileRunning) {
  rig.configure(dev, 0);
  expect_error(dev.set_features(virtio::bit(virtio::feature::version_1)), Errc::bad_state,
               "while rings are running");
}

// --- owner -------------------------------------------------------------------------------------

TEST(HostileOwner, VringOpsBeforeSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  auto check = [](const Result<>& r) {
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, Errc::bad_state);
    EXPECT_NE(r.error().detail.find("before SET_OWNER"), std::string::npos);
  };
  check(dev.set_vring_num(0, 256));
  check(dev.set_vring_addr(0, memory::VringAddr{}));
  check(dev.set_vring_base(0, 0));
  check(dev.set_vring_kick(0, testing::make_eventfd()));
  check(dev.set_vring_enable(0, true));
}
// Stopping a ring needs no owner: no ring runs without one, so it reports a stopped ring's base.
TEST(HostileOwner, StoppingRingsBeforeSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  EXPECT_TRUE(dev.set_vring_enable(0, false).has_value());
  auto base = dev.get_vring_base(0);
  ASSERT_TRUE(base.has_value());
  EXPECT_EQ(*base, 0u);
  EXPECT_FALSE(dev.get_vring_base(99).has_value());
  EXPECT_FALSE(dev.set_vring_enable(99, false).has_value());
  EXPECT_FALSE(dev.has_owner());
  EXPECT_FALSE(dev.queue(0).started());
}
// Call and err fds are notification fds only: taken before SET_OWNER (a reconnecting DPDK
// virtio-user sends them first), still range-checked, and closed by reset().
TEST(HostileOwner, CallAndErrFdsBeforeSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  UniqueFd call = testing::make_eventfd();
  UniqueFd seen = testing::dup_fd(call.get());
  const std::size_t fds_before = vhostkit::testing::open_fd_count();
  EXPECT_TRUE(dev.set_vring_call(0, std::move(call)).has_value());
  EXPECT_TRUE(dev.set_vring_err(0, testing::make_eventfd()).has_value());
  EXPECT_FALSE(dev.has_owner());
  auto out = dev.set_vring_call(99, testing::make_eventfd());
  ASSERT_FALSE(out.has_value());
  EXPECT_EQ(out.error().code, Errc::out_of_range);
  ASSERT_TRUE(dev.set_owner().has_value());
  dev.queue(0).signal();  // SET_OWNER kept the call fd
  EXPECT_TRUE(testing::wait_fd(seen.get(), 1000));
  dev.reset();  // the session's end closes both
  EXPECT_EQ(vhostkit::testing::open_fd_count(), fds_before - 1);
  dev.queue(0).signal();
  EXPECT_FALSE(testing::wait_fd(seen.get(), 50));
}
TEST(HostileOwner, MemTableBeforeSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  Rig rig;
  auto r = dev.set_mem_table(rig.table());
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::bad_state);
  EXPECT_EQ(dev.memory().region_count(), 0u);
  EXPECT_FALSE(dev.add_mem_region(rig.region()).has_value());
}
TEST(HostileOwner, FeaturesBeforeSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  EXPECT_EQ(dev.offered_features(), kEchoFeatures);  // GET_FEATURES needs no owner
  EXPECT_FALSE(dev.set_features(kEchoFeatures).has_value());
  EXPECT_FALSE(dev.reset_owner().has_value());
}
TEST(HostileOwner, DoubleSetOwner) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  ASSERT_TRUE(dev.set_owner().has_value());
  auto r = dev.set_owner();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::bad_state);
  EXPECT_TRUE(dev.has_owner());
}

// --- state ---------------------------------------------------------------------------------------

TEST_F(Hostile, SetVringBaseWhileRunning) {
  rig.configure(dev, 0);
  expect_error(dev.set_vring_base(0, 5), Errc::bad_state, "running");
}
TEST_F(Hostile, SetVringNumWhileRunning) {
  rig.configure(dev, 0);
  expect_error(dev.set_vring_num(0, 128), Errc::bad_state, "running");
}
TEST_F(Hostile, MoveRingAddressWhileRunning) {
  rig.configure(dev, 0);
  memory::VringAddr a = rig.addr(0);
  a.used_user_addr += 4096;
  expect_error(dev.set_vring_addr(0, a), Errc::bad_state);
}
TEST_F(Hostile, VringBaseOver16Bits) {
  expect_error(dev.set_vring_base(0, 65536), Errc::out_of_range, "65536");
}

// --- memory ------------------------------------------------------------------------------------

TEST_F(Hostile, BadMemTableLeavesOldIntact) {
  rig.configure(dev, 0);
  std::vector<memory::RegionFd> bad;
  bad.push_back(rig.region());
  bad.push_back(rig.region());  // the same range twice: overlap
  auto r = dev.set_mem_table(std::move(bad));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(dev.memory().region_count(), 1u);
  EXPECT_TRUE(dev.queue(0).started());
  rig.post(0, "still here", 0);
  auto u = rig.wait_used(0);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(rig.reply(0, 0, 10), "still here");
}
// Bad, then good: the refused table leaves the ring running on the old one (same mapping); the
// good one replaces it under the running ring.
TEST_F(Hostile, BadMemTableThenGoodTable) {
  rig.configure(dev, 0);
  const std::uint8_t* host = dev.memory().gpa_to_host(Rig::kDataGpa, 16);
  ASSERT_NE(host, nullptr);
  std::vector<memory::RegionFd> bad;
  bad.push_back(rig.region());
  // A second region past the end of the memfd: the first maps, the second fails.
  const memory::RegionSpec past{Rig::kMemSize, 4096, rig.uva(0) + Rig::kMemSize * 2, Rig::kMemSize};
  bad.push_back(memory::RegionFd{past, testing::dup_fd(rig.memfd())});
  ASSERT_FALSE(dev.set_mem_table(std::move(bad)).has_value());
  ASSERT_EQ(dev.memory().region_count(), 1u);
  EXPECT_EQ(dev.memory().gpa_to_host(Rig::kDataGpa, 16), host);
  EXPECT_NE(dev.memory().uva_to_host(rig.addr(0).used_user_addr, 4), nullptr);
  EXPECT_TRUE(dev.queue(0).started());
  rig.post(0, "old table", 1);
  ASSERT_TRUE(rig.wait_used(0, 20000).has_value());
  EXPECT_EQ(rig.reply(0, 1, 9), "old table");
  auto good = dev.set_mem_table(rig.table());
  ASSERT_TRUE(good.has_value()) << good.error().message();
  ASSERT_EQ(dev.memory().region_count(), 1u);
  EXPECT_TRUE(dev.queue(0).started());
  rig.post(0, "new table", 2);
  ASSERT_TRUE(rig.wait_used(0, 20000).has_value());
  EXPECT_EQ(rig.reply(0, 2, 9), "new table");
}
TEST_F(Hostile, MemTableNotCoveringRunningRingRefused) {
  rig.configure(dev, 0);
  std::vector<memory::RegionFd> t;
  // Only the second half of memory: the ring (at gpa 0) is gone.
  t.push_back(memory::RegionFd{memory::RegionSpec{Rig::kMemSize / 2, Rig::kMemSize / 2,
                                                  rig.uva(Rig::kMemSize / 2), Rig::kMemSize / 2},
                               testing::dup_fd(rig.memfd())});
  auto r = dev.set_mem_table(std::move(t));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().detail.find("running ring"), std::string::npos) << r.error().message();
  EXPECT_EQ(dev.memory().regions()[0].spec.size, Rig::kMemSize);
}
// A ring that has everything but memory covering it (its addresses came before its size, so
// nothing checked them then) starts with the first table that covers it. A table that does not
// is refused whole, like one that drops a running ring: it must not be installed with only the
// ring's start failing.
TEST(HostileMemTable, TableNotCoveringAReadyRingChangesNothing) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  Rig rig;
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  // Memory from `from` up; the rings (from gpa 0) lie below the data area.
  auto from = [&](std::uint64_t gpa) {
    std::vector<memory::RegionFd> t;
    t.push_back(memory::RegionFd{memory::RegionSpec{gpa, Rig::kMemSize - gpa, rig.uva(gpa), gpa},
                                 testing::dup_fd(rig.memfd())});
    return t;
  };
  ASSERT_TRUE(dev.set_mem_table(from(Rig::kDataGpa)).has_value());
  rig.init_driver(0);
  ASSERT_TRUE(dev.set_vring_addr(0, rig.addr(0)).has_value());  // no size yet: not checked
  ASSERT_TRUE(dev.set_vring_num(0, rig.ring_size()).has_value());
  ASSERT_TRUE(dev.set_vring_base(0, 0).has_value());
  UniqueFd call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  rig.set_kick(0, testing::make_eventfd());
  EXPECT_FALSE(dev.set_vring_kick(0, testing::dup_fd(rig.kick_fd(0))).has_value());
  ASSERT_FALSE(dev.queue(0).started());
  const std::uint8_t* host = dev.memory().gpa_to_host(Rig::kDataGpa, 16);

  auto r = dev.set_mem_table(from(Rig::kDataGpa + 0x100000));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().detail.find("ready ring"), std::string::npos) << r.error().message();
  ASSERT_EQ(dev.memory().region_count(), 1u);
  EXPECT_EQ(dev.memory().regions()[0].spec.guest_phys_addr, Rig::kDataGpa);
  EXPECT_EQ(dev.memory().gpa_to_host(Rig::kDataGpa, 16), host);
  EXPECT_FALSE(dev.queue(0).started());

  // A table that covers the ring: taken, and the ring starts on it.
  auto ok = dev.set_mem_table(rig.table());
  ASSERT_TRUE(ok.has_value()) << ok.error().message();
  ASSERT_TRUE(dev.queue(0).started());
  rig.post(0, "started", 3);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::optional<virtq::DriverQueue::Used> u;
  while (!(u = rig.driver(0).get_used()) && std::chrono::steady_clock::now() < deadline) {
    testing::wait_fd(call.get(), 50);
  }
  ASSERT_TRUE(u.has_value()) << "the ring did not serve within 20 s";
  EXPECT_EQ(rig.reply(0, 3, 7), "started");
}
// A ring is translated once, when its size, addresses and memory are all known, and the start
// uses that translation: it must follow every change of the table. Ring 0 lives in the first
// kRingStride bytes (region A), everything else in region B.
std::vector<memory::RegionFd> split_table(const Rig& rig, bool with_a) {
  std::vector<memory::RegionFd> t;
  if (with_a) {
    t.push_back(memory::RegionFd{memory::RegionSpec{0, Rig::kRingStride, rig.uva(0), 0},
                                 testing::dup_fd(rig.memfd())});
  }
  t.push_back(
      memory::RegionFd{memory::RegionSpec{Rig::kRingStride, Rig::kMemSize - Rig::kRingStride,
                                          rig.uva(Rig::kRingStride), Rig::kRingStride},
                       testing::dup_fd(rig.memfd())});
  return t;
}
// Without the table change reaching the kept translation, the restart would attach the ring to
// pointers into the unmapped region.
TEST(HostileMemTable, RemovedRegionUnderAStoppedRingIsNotUsed) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  Rig rig;
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  ASSERT_TRUE(dev.set_mem_table(split_table(rig, true)).has_value());
  rig.configure(dev, 0);
  ASSERT_TRUE(dev.queue(0).started());
  ASSERT_TRUE(dev.get_vring_base(0).has_value());
  ASSERT_FALSE(dev.queue(0).started());
  ASSERT_TRUE(dev.remove_mem_region(split_table(rig, true)[0].spec).has_value());
  rig.set_kick(0, testing::make_eventfd());
  auto r = dev.set_vring_kick(0, testing::dup_fd(rig.kick_fd(0)));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::not_mapped) << r.error().message();
  EXPECT_NE(r.error().detail.find("desc table"), std::string::npos) << r.error().message();
  EXPECT_FALSE(dev.queue(0).started());
}
// A ready ring whose addresses did not translate starts once ADD_MEM_REG brings its memory.
TEST(HostileMemTable, AddedRegionStartsAReadyRing) {
  EchoBackend be;
  Device dev(be, DeviceOptions{});
  Rig rig;
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  ASSERT_TRUE(dev.set_mem_table(split_table(rig, false)).has_value());
  rig.init_driver(0);
  ASSERT_TRUE(dev.set_vring_addr(0, rig.addr(0)).has_value());  // no size yet: not translated
  ASSERT_TRUE(dev.set_vring_num(0, rig.ring_size()).has_value());
  ASSERT_TRUE(dev.set_vring_base(0, 0).has_value());
  UniqueFd call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  rig.set_kick(0, testing::make_eventfd());
  EXPECT_FALSE(dev.set_vring_kick(0, testing::dup_fd(rig.kick_fd(0))).has_value());
  ASSERT_FALSE(dev.queue(0).started());
  auto a = dev.add_mem_region(std::move(split_table(rig, true)[0]));
  ASSERT_TRUE(a.has_value()) << a.error().message();
  ASSERT_TRUE(dev.queue(0).started());
  rig.post(0, "added", 4);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::optional<virtq::DriverQueue::Used> u;
  while (!(u = rig.driver(0).get_used()) && std::chrono::steady_clock::now() < deadline) {
    testing::wait_fd(call.get(), 50);
  }
  ASSERT_TRUE(u.has_value()) << "the ring did not serve within 20 s";
  EXPECT_EQ(rig.reply(0, 4, 5), "added");
}
// A region whose mmap_offset and userspace_addr differ in alignment moves an aligned used ring
// to a misaligned host address, where the ring's index words can't be read atomically: the
// translation refuses it at SET_VRING_ADDR, naming the part, instead of a ring that starts
// broken.
TEST_F(Hostile, RingMisalignedInHostMemory) {
  std::vector<memory::RegionFd> t;
  t.push_back(memory::RegionFd{memory::RegionSpec{0, Rig::kMemSize - 4096, rig.uva(0), 2},
                               testing::dup_fd(rig.memfd())});
  ASSERT_TRUE(dev.set_mem_table(std::move(t)).has_value());
  ASSERT_TRUE(dev.set_vring_num(0, rig.ring_size()).has_value());
  expect_error(dev.set_vring_addr(0, rig.addr(0)), Errc::invalid_argument, "used ring at 0x");
  EXPECT_FALSE(dev.queue(0).started());
}
// The slot limit is the table's own (GuestMemory::kMaxRegions, what GET_MAX_MEM_SLOTS
// advertises); the refusal names the request and the limit.
TEST_F(Hostile, AddMemRegPastTheSlotLimit) {
  constexpr std::uint64_t kPage = 4096;
  const std::uint64_t n = memory::GuestMemory::kMaxRegions;
  UniqueFd fd = memory::testing::make_memfd(n * kPage);
  const std::uint64_t gpa0 = Rig::kMemSize;                   // past the rig's own region
  const std::uint64_t uva0 = rig.uva(0) + 2 * Rig::kMemSize;  // a frontend address range of its own
  auto region = [&](std::uint64_t i) {
    return memory::RegionFd{
        memory::RegionSpec{gpa0 + i * kPage, kPage, uva0 + i * kPage, i * kPage},
        testing::dup_fd(fd.get())};
  };
  for (std::uint64_t i = 0; i + 1 < n; ++i) {  // the rig's region holds one slot
    auto r = dev.add_mem_region(region(i));
    ASSERT_TRUE(r.has_value()) << "region " << i << ": " << r.error().message();
  }
  ASSERT_EQ(dev.memory().region_count(), n);
  auto r = dev.add_mem_region(region(n - 1));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::too_many);
  EXPECT_EQ(r.error().detail.rfind("ADD_MEM_REG: ", 0), 0u) << r.error().message();
  EXPECT_NE(r.error().detail.find("(max 509)"), std::string::npos) << r.error().message();
  EXPECT_EQ(dev.memory().region_count(), n);
}
TEST_F(Hostile, RemoveRegionUnderRunningRingRefused) {
  rig.configure(dev, 0);
  auto r = dev.remove_mem_region(rig.spec());
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, Errc::bad_state);
  EXPECT_EQ(dev.memory().region_count(), 1u);
}

// --- fds ---------------------------------------------------------------------------------------

TEST_F(Hostile, HungUpKickFdBreaksRingWithoutSpinning) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  ::close(p[1]);  // readable forever (EOF)
  rig.init_driver(0);
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  ASSERT_TRUE(dev.set_vring_addr(0, rig.addr(0)).has_value());
  ASSERT_TRUE(dev.set_vring_kick(0, UniqueFd(p[0])).has_value());
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  // Breaking is the worker's first wake-up on the dead fd: milliseconds, on a loaded host
  // more; the deadline only bounds a failure.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!dev.broken() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(dev.broken());
  EXPECT_FALSE(dev.queue(0).started());
  const auto w = dev.worker_for(0).wakeups();
  // A negative can only be watched for a while: a worker still polling an fd that is readable
  // forever would wake thousands of times in 100 ms.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_LE(dev.worker_for(0).wakeups(), w + 1) << "the worker keeps waking on a dead fd";
}
TEST_F(Hostile, CallFdNobodyReadsDoesNotStallWorker) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd never_read(p[0]);
  ASSERT_EQ(::fcntl(p[1], F_SETPIPE_SZ, 4096), 4096);  // full after 512 calls
  rig.configure(dev, 0);
  ASSERT_TRUE(dev.set_vring_call(0, UniqueFd(p[1])).has_value());
  for (int i = 0; i < 700; ++i) {
    rig.post(0, "x", i);
    auto u = rig.wait_used(0, 1000, /*poll_call=*/false);
    ASSERT_TRUE(u.has_value()) << "stalled at " << i;
  }
}

}  // namespace
}  // namespace vhostkit::vhost
