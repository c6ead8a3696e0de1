// A hostile front-end's memory tables against BackendSession: overlapping, wrapping, past the
// file, unmappable, not covering a running ring, too many regions, too few fds, and ADD_MEM_REG
// misuse. A bad table is refused and changes nothing: the old table stays mapped, the rings on it
// keep running, a later good table is taken, and nothing leaks.
#include "testing/backend_hostile_rig.h"

namespace vhostkit::vhost_user {
namespace {

using namespace hostile_rig;

// Generous: the host is a loaded 2-core VM; an echo normally takes well under a millisecond.
constexpr auto kEchoTimeout = 20s;

// ---- memory tables ----------------------------------------------------------------------

// The running table as it was before a refused one: the same one region, at the same host
// mapping, and ring 0 still echoing through it.
void expect_old_table_serving(Hostile& h, const std::uint8_t* host_before) {
  ASSERT_EQ(h.device.memory().region_count(), 1u);
  EXPECT_EQ(h.device.memory().regions()[0].spec.guest_phys_addr, TestFrontend::kGpaBase);
  EXPECT_EQ(h.device.memory().regions()[0].spec.size, TestFrontend::kMemSize);
  EXPECT_EQ(h.device.memory().gpa_to_host(TestFrontend::kGpaBase, TestFrontend::kMemSize),
            host_before);
  EXPECT_TRUE(h.device.queue(0).started());
  EXPECT_FALSE(h.device.broken());
  auto e = h.fe->echo(0, 300, 7, kEchoTimeout);
  EXPECT_TRUE(e.has_value()) << "the ring stopped with the refused table: " << e.error().message();
}

// Negotiated, with ring 0 echoing on the one-region table; returns that table's host mapping.
const std::uint8_t* running(Hostile& h) {
  auto n = h.fe->negotiate();
  EXPECT_TRUE(n.has_value()) << n.error().message();
  auto e = h.fe->echo(0, 64, 1, kEchoTimeout);
  EXPECT_TRUE(e.has_value()) << e.error().message();
  return h.device.memory().gpa_to_host(TestFrontend::kGpaBase, TestFrontend::kMemSize);
}

// A table that can't be used, sent with NEED_REPLY: a failure ack, and nothing changed.
void expect_bad_table(Hostile& h, const std::uint8_t* host_before, SetMemTable t) {
  ASSERT_NE(host_before, nullptr);
  auto a = h.fe->request(t, true);
  ASSERT_TRUE(a.has_value()) << a.error().message();
  EXPECT_NE(*a, 0u);
  expect_old_table_serving(h, host_before);
  h.expect_alive();
}

SetMemTable two_regions(Hostile& h, memory::RegionSpec a, memory::RegionSpec b) {
  SetMemTable t;
  t.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
  t.regions.push_back(memory::RegionFd{b, h.fe->dup_memfd()});
  return t;
}

TEST(BackendHostile, MemTableOverlappingGuestRanges) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    auto b = a;
    b.guest_phys_addr += a.size / 2;
    b.userspace_addr += a.size * 4;
    expect_bad_table(h, host, two_regions(h, a, b));
  });
}

TEST(BackendHostile, MemTableOverlappingUserRanges) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    auto b = a;
    b.guest_phys_addr += a.size * 4;
    b.userspace_addr += 4096;
    expect_bad_table(h, host, two_regions(h, a, b));
  });
}

TEST(BackendHostile, MemTableWrappingRegion) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    a.guest_phys_addr = std::numeric_limits<std::uint64_t>::max() - 4095;
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
    expect_bad_table(h, host, std::move(t));
  });
}

TEST(BackendHostile, MemTableOffsetPastTheFile) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    a.mmap_offset = TestFrontend::kMemSize;
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
    expect_bad_table(h, host, std::move(t));
  });
}

TEST(BackendHostile, MemTableZeroSizeRegion) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    a.size = 0;
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
    expect_bad_table(h, host, std::move(t));
  });
}

TEST(BackendHostile, MemTableNotAMappableFd) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{h.fe->region(), test::make_eventfd()});
    expect_bad_table(h, host, std::move(t));
  });
}

TEST(BackendHostile, MemTableNineRegions) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
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
    expect_old_table_serving(h, host);
    h.expect_alive();
  });
}

TEST(BackendHostile, MemTableFewerFdsThanRegions) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
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
    expect_old_table_serving(h, host);
    h.expect_alive();
  });
}

// A table that maps fine but leaves the running rings out (only the upper half of memory; the
// rings sit in the lower half): mapped, checked against the rings, unmapped again, refused.
TEST(BackendHostile, MemTableNotCoveringTheRunningRings) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    auto a = h.fe->region();
    a.guest_phys_addr += TestFrontend::kMemSize / 2;
    a.userspace_addr += TestFrontend::kMemSize / 2;
    a.mmap_offset = TestFrontend::kMemSize / 2;
    a.size = TestFrontend::kMemSize / 2;
    SetMemTable t;
    t.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
    expect_bad_table(h, host, std::move(t));
  });
}

// Bad, then good: a refused table (no NEED_REPLY: the front-end is not told) leaves the rings
// running on the old one; the next valid table replaces it and the rings move to it.
TEST(BackendHostile, BadTableThenGoodTable) {
  hostile([](Hostile& h) {
    const std::uint8_t* host = running(h);
    ASSERT_NE(host, nullptr);
    auto a = h.fe->region();
    a.size = 0;
    SetMemTable bad;
    bad.regions.push_back(memory::RegionFd{a, h.fe->dup_memfd()});
    ASSERT_TRUE(h.fe->request(bad, false));
    EXPECT_TRUE(h.last.has_value()) << h.last.error().message();
    expect_old_table_serving(h, host);
    // The same memory through a new fd: a new mapping, which the running rings move to.
    ASSERT_TRUE(h.fe->set_mem_table());
    ASSERT_EQ(h.device.memory().region_count(), 1u);
    EXPECT_TRUE(h.device.queue(0).started());
    for (std::uint32_t i = 0; i < 2; ++i) {
      auto e = h.fe->echo(i, 500, 9, kEchoTimeout);
      EXPECT_TRUE(e.has_value()) << "ring " << i << ": " << e.error().message();
    }
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
    m.region = memory::RegionFd{r, h.fe->dup_memfd()};
    h.expect_refused(m);
    EXPECT_EQ(h.device.memory().region_count(), 1u);
  });
}

TEST(BackendHostile, AddMemRegWithoutConfigureMemSlots) {
  hostile([](Hostile& h) {
    test::FrontendOptions o;
    ASSERT_TRUE(h.fe->handshake(o));
    // Renegotiate protocol features without CONFIGURE_MEM_SLOTS.
    ASSERT_TRUE(
        h.fe->request(SetProtocolFeatures{protocol_bit(protocol_feature::reply_ack)}, false));
    AddMemReg m;
    m.region = memory::RegionFd{h.fe->region(), h.fe->dup_memfd()};
    h.expect_refused(m);
  });
}

}  // namespace
}  // namespace vhostkit::vhost_user
