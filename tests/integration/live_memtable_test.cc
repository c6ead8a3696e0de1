// The memory table changed while frames flow through a loopback back-end, the way QEMU changes
// it while a guest runs: SET_MEM_TABLE with the same regions again (a ROM mapping or hot-plug
// elsewhere makes QEMU resend the whole table), a table with one more region and back, and
// ADD_MEM_REG / REM_MEM_REG of a region no ring uses. Afterwards every frame must have arrived
// once, intact and in order: the rings must have carried on exactly where they were.
#include <sys/mman.h>

#include "live_rig.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::live {
namespace {

constexpr std::uint64_t kMemSlots = std::uint64_t{1}
                                    << vhost_user::protocol_feature::configure_mem_slots;

// A region the front-end plugs in: its own memfd, mapped here so its user address is real, at a
// guest address far past the session's memory. No ring or buffer lives in it.
struct ExtraRegion {
  ExtraRegion(std::uint64_t gpa, std::size_t size)
      : fd(::memfd_create("vk-live-extra", MFD_CLOEXEC)) {
    if (!fd || ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return;
    map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (map == MAP_FAILED) {
      map = nullptr;
      return;
    }
    spec = memory::RegionSpec{.guest_phys_addr = gpa,
                              .size = size,
                              .userspace_addr = reinterpret_cast<std::uint64_t>(map),
                              .mmap_offset = 0};
  }
  ~ExtraRegion() {
    if (map != nullptr) ::munmap(map, spec.size);
  }
  memory::RegionFd region() const { return memory::RegionFd{spec, UniqueFd(::dup(fd.get()))}; }

  UniqueFd fd;
  void* map = nullptr;
  memory::RegionSpec spec;
};

TEST(LiveMemTable, ReplacedExtendedAddedAndRemovedWhileFramesFlow) {
  NetBackend be(1, "memtable");
  ASSERT_TRUE(be.listening);
  auto s = be.connect(1, kMemSlots);
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& fe = **s;
  ASSERT_TRUE(fe.session().has_protocol(vhost_user::protocol_feature::configure_mem_slots));

  // The session's one region, as its SET_MEM_TABLE described it.
  UniqueFd memfd = memfd_of(fe.session().memory());
  ASSERT_TRUE(memfd.valid()) << "no fd for the front-end's memory";
  const memory::RegionSpec own{
      .guest_phys_addr = 0,
      .size = fe.session().memory().size(),
      .userspace_addr = reinterpret_cast<std::uint64_t>(fe.session().memory().data()),
      .mmap_offset = 0};
  auto own_region = [&] { return memory::RegionFd{own, UniqueFd(::dup(memfd.get()))}; };
  ExtraRegion extra(std::uint64_t{1} << 32, 2u << 20);
  ASSERT_NE(extra.map, nullptr);

  Control ctl(fe.session().socket_fd());
  // After each ack the session thread is idle: reading the table's size here races with nothing.
  auto regions = [&] { return be.device.memory().region_count(); };

  PairDriver drv(fe, be.net, 0, /*exact=*/true);
  ASSERT_TRUE(drv.wait_progress(500)) << drv.describe();
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE(fmt::format("round {}", round));
    {
      vhost_user::SetMemTable same;
      same.regions.push_back(own_region());
      auto r = ctl.request(same);
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(regions(), 1u);
      ASSERT_TRUE(drv.wait_progress(200)) << "after the same table: " << drv.describe();
    }
    {
      vhost_user::SetMemTable plugged;
      plugged.regions.push_back(own_region());
      plugged.regions.push_back(extra.region());
      auto r = ctl.request(plugged);
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(regions(), 2u);
      ASSERT_TRUE(drv.wait_progress(200)) << "after a table with a region more: " << drv.describe();
    }
    {
      vhost_user::SetMemTable unplugged;
      unplugged.regions.push_back(own_region());
      auto r = ctl.request(unplugged);
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(regions(), 1u);
      ASSERT_TRUE(drv.wait_progress(200)) << "after the region went again: " << drv.describe();
    }
    {
      auto r = ctl.request(vhost_user::AddMemReg{.region = extra.region()});
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(regions(), 2u);
      ASSERT_TRUE(drv.wait_progress(200)) << "after ADD_MEM_REG: " << drv.describe();
    }
    {
      auto r = ctl.request(vhost_user::RemMemReg{.spec = extra.spec});
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(regions(), 1u);
      ASSERT_TRUE(drv.wait_progress(200)) << "after REM_MEM_REG: " << drv.describe();
    }
  }
  ASSERT_TRUE(drv.stop()) << "frames neither received nor counted as dropped: " << drv.describe();
  EXPECT_EQ(drv.errors(), 0u) << drv.describe();
  EXPECT_EQ(drv.received(), drv.sent()) << drv.describe();
  EXPECT_EQ(drv.drops(), 0u) << drv.describe();
  for (std::uint16_t i = 0; i < 2; ++i) {
    EXPECT_EQ(fe.session().ring(i).vq.bad_used(), 0u) << "ring " << i;
    EXPECT_TRUE(be.device.queue(i).started()) << "ring " << i;
    EXPECT_FALSE(be.device.queue(i).broken()) << "ring " << i;
  }
  EXPECT_EQ(fe.stats(0).bad, 0u);
}

}  // namespace
}  // namespace vhostkit::live
