// A hostile front-end's memory tables against BackendSession: overlapping, wrapping, past the
// file, unmappable, too many regions, too few fds, and ADD_MEM_REG misuse. A bad table is refused,
// the session is marked broken until a good one arrives, and nothing leaks.
#include "backend_hostile_rig.h"

namespace vhostkit::vhost_user {
namespace {

using namespace hostile_rig;

// ---- memory tables ----------------------------------------------------------------------

// A table that can't be mapped: refused, the session marked broken, rings stopped.
void expect_bad_table(Hostile& h, SetMemTable t) {
  auto a = h.fe->request(t, true);
  ASSERT_TRUE(a.has_value()) << a.error().message();
  EXPECT_NE(*a, 0u);
  EXPECT_TRUE(h.session->broken());
  EXPECT_EQ(h.device.memory().region_count(), 0u);
  EXPECT_FALSE(h.device.queue(0).started());
  h.expect_alive();
}

SetMemTable two_regions(Hostile& h, memory::RegionSpec a, memory::RegionSpec b) {
  SetMemTable t;
  t.regions.push_back(MemRegion{a, h.fe->dup_memfd()});
  t.regions.push_back(MemRegion{b, h.fe->dup_memfd()});
  return t;
}

TEST(BackendHostile, MemTableOverlappingGuestRanges) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    auto a = h.fe->region();
    auto b = a;
    b.guest_phys_addr += a.size / 2;
    b.userspace_addr += a.size * 4;
    expect_bad_table(h, two_regions(h, a, b));
  });
}

TEST(BackendHostile, MemTableOverlappingUserRanges) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    auto a = h.fe->region();
    auto b = a;
    b.guest_phys_addr += a.size * 4;
    b.userspace_addr += 4096;
    expect_bad_table(h, two_regions(h, a, b));
  });
}

TEST(BackendHostile, MemTableWrappingRegion) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    auto a = h.fe->region();
    a.guest_phys_addr = std::numeric_limits<std::uint64_t>::max() - 4095;
    SetMemTable t;
    t.regions.push_back(MemRegion{a, h.fe->dup_memfd()});
    expect_bad_table(h, std::move(t));
  });
}

TEST(BackendHostile, MemTableOffsetPastTheFile) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    auto a = h.fe->region();
    a.mmap_offset = TestFrontend::kMemSize;
    SetMemTable t;
    t.regions.push_back(MemRegion{a, h.fe->dup_memfd()});
    expect_bad_table(h, std::move(t));
  });
}

TEST(BackendHostile, MemTableZeroSizeRegion) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    auto a = h.fe->region();
    a.size = 0;
    SetMemTable t;
    t.regions.push_back(MemRegion{a, h.fe->dup_memfd()});
    expect_bad_table(h, std::move(t));
  });
}

TEST(BackendHostile, MemTableNotAMappableFd) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    SetMemTable t;
    t.regions.push_back(MemRegion{h.fe->region(), test::make_eventfd()});
    expect_bad_table(h, std::move(t));
  });
}

TEST(BackendHostile, MemTableNineRegions) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    std::array<std::uint8_t, sizeof(wire::Memory)> p{};
    const std::uint32_t nine = 9;
    std::memcpy(p.data(), &nine, 4);
    std::vector<UniqueFd> owned;
    std::vector<int> raw;
    for (int i = 0; i < 8; ++i) {
      owned.push_back(h.fe->dup_memfd());
      raw.push_back(owned.back().get());
    }
    h.raw(Request::set_mem_table, kNeedReplyFlag, p, raw);
    EXPECT_NE(h.ack(Request::set_mem_table), 0u);
    EXPECT_EQ(h.device.memory().region_count(), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, MemTableFewerFdsThanRegions) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    wire::Memory m{};
    m.nregions = 2;
    m.regions[0] = {TestFrontend::kGpaBase, 4096, h.fe->uva_base(), 0};
    m.regions[1] = {TestFrontend::kGpaBase + 8192, 4096, h.fe->uva_base() + 8192, 8192};
    UniqueFd one = h.fe->dup_memfd();
    const int raw = one.get();
    h.raw(Request::set_mem_table, kNeedReplyFlag,
          std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(&m),
                                        wire::kMemoryHeaderSize + 2 * sizeof(wire::MemoryRegion)),
          {&raw, 1});
    EXPECT_NE(h.ack(Request::set_mem_table), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, BrokenSessionRecoversWithAValidTable) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    ASSERT_TRUE(h.fe->echo(0, 64));
    auto a = h.fe->region();
    a.size = 0;
    SetMemTable bad;
    bad.regions.push_back(MemRegion{a, h.fe->dup_memfd()});
    ASSERT_TRUE(h.fe->request(bad, false));
    EXPECT_TRUE(h.session->broken());
    EXPECT_FALSE(h.device.queue(0).started());
    ASSERT_TRUE(h.fe->set_mem_table());
    EXPECT_FALSE(h.session->broken());
    EXPECT_EQ(h.device.memory().region_count(), 1u);
  });
}

TEST(BackendHostile, AddMemRegOverlappingAnExistingRegion) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    ASSERT_TRUE(h.fe->set_mem_table());
    AddMemReg m;
    auto r = h.fe->region();
    r.guest_phys_addr += 4096;
    r.userspace_addr += r.size * 2;
    r.size = 4096;
    m.region = MemRegion{r, h.fe->dup_memfd()};
    h.expect_refused(m);
    EXPECT_EQ(h.device.memory().region_count(), 1u);
  });
}

TEST(BackendHostile, AddMemRegWithoutConfigureMemSlots) {
  hostile([](Hostile& h) {
    test::FrontendOptions o;
    ASSERT_TRUE(h.fe->handshake(o));
    // Renegotiate protocol features without CONFIGURE_MEM_SLOTS.
    ASSERT_TRUE(h.fe->request(SetProtocolFeatures{protocol_bit(protocol_feature::reply_ack)}, false));
    AddMemReg m;
    m.region = MemRegion{h.fe->region(), h.fe->dup_memfd()};
    h.expect_refused(m);
  });
}

}  // namespace
}  // namespace vhostkit::vhost_user
