// FrontendSession and the ring layout: the packed ring and IN_ORDER are acked only when wanted,
// drivable and offered; a packed ring is laid out and announced as the vhost-user spec says
// (SET_VRING_ADDR with the descriptor ring and the two event suppression areas, SET_VRING_BASE
// with both wrap counters), and GET_VRING_BASE's packed answer is checked against the ring.
#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <vector>

#include "testing/fake_backend.h"
#include "vhostkit/vhost_user/frontend_session.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using vhostkit::testing::Action;
using vhostkit::testing::FakeBackend;
using vhostkit::testing::on;

constexpr std::uint64_t pbit(unsigned n) { return std::uint64_t{1} << n; }
constexpr std::uint64_t kPacked = virtio::bit(virtio::feature::ring_packed);
constexpr std::uint64_t kInOrder = virtio::bit(virtio::feature::in_order);
constexpr std::uint64_t kBase =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx);
constexpr std::uint64_t kOfferedProtocol =
    pbit(protocol_feature::reply_ack) | pbit(protocol_feature::config);

// What the fake back-end was told about the rings.
struct Seen {
  std::mutex mu;
  std::vector<SetVringAddr> addrs;
  std::vector<SetVringBase> bases;
};

struct Attempt {
  std::shared_ptr<Seen> seen = std::make_shared<Seen>();
  std::unique_ptr<FakeBackend> fake;
  Result<std::unique_ptr<FrontendSession>> session = fail(Errc::bad_state, "not run");
};

Attempt attempt(std::uint64_t wanted, std::uint64_t offered, FakeBackend::Hook extra = {}) {
  Attempt a;
  auto pair = socketpair();
  EXPECT_TRUE(pair);
  auto seen = a.seen;
  FakeBackend::Hook hook = [seen, extra](Channel& ch, const Header& h, const FrontendMessage& m) {
    {
      std::lock_guard lk(seen->mu);
      if (auto* v = std::get_if<SetVringAddr>(&m)) seen->addrs.push_back(*v);
      if (auto* v = std::get_if<SetVringBase>(&m)) seen->bases.push_back(*v);
    }
    return extra ? extra(ch, h, m) : Action::normal;
  };
  a.fake = std::make_unique<FakeBackend>(
      std::move(pair->second),
      FakeBackend::Script{.features = offered | virtio::bit(virtio::feature::protocol_features),
                          .protocol_features = kOfferedProtocol},
      std::move(hook));
  FrontendOptions o;
  o.channel = std::move(pair->first);
  o.rings = 2;
  o.queue_size = 64;
  o.ring_area_bytes = 4096;
  o.memory_size = 0;
  o.features = wanted;
  o.drivable = kBase | kPacked | kInOrder;
  o.timeout = 1000ms;
  a.session = FrontendSession::connect(std::move(o));
  if (a.session) {
    if (auto r = (*a.session)->start_rings(); !r) a.session = std::unexpected(std::move(r.error()));
  }
  return a;
}

TEST(FrontendLayout, PackedRingIsAnnouncedWithItsThreeAreasAndWrapCounters) {
  Attempt a = attempt(kBase | kPacked, kBase | kPacked | kInOrder);
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto& s = **a.session;
  EXPECT_EQ(s.layout(), RingLayout::packed);
  EXPECT_FALSE(s.in_order());  // offered, not wanted
  EXPECT_EQ(a.fake->set_features(),
            kBase | kPacked | virtio::bit(virtio::feature::protocol_features));
  std::lock_guard lk(a.seen->mu);
  ASSERT_EQ(a.seen->addrs.size(), 2u);
  ASSERT_EQ(a.seen->bases.size(), 2u);
  const auto uva = [&](std::uint64_t gpa) {
    return reinterpret_cast<std::uint64_t>(s.memory().data()) + gpa;
  };
  for (std::uint16_t i = 0; i < 2; ++i) {
    const FrontendRing& r = s.ring(i);
    ASSERT_TRUE(r.packed);
    EXPECT_EQ(r.pvq.size(), 64);
    EXPECT_EQ(r.vq.size(), 0);  // never initialised
    const auto& addr = a.seen->addrs[i];
    EXPECT_EQ(addr.index, i);
    EXPECT_EQ(addr.addr.desc_user_addr, uva(r.pvq.desc_gpa()));
    EXPECT_EQ(addr.addr.avail_user_addr, uva(r.pvq.driver_event_gpa()));
    EXPECT_EQ(addr.addr.used_user_addr, uva(r.pvq.device_event_gpa()));
    EXPECT_EQ(reinterpret_cast<std::uint64_t>(r.pvq.desc()), uva(r.pvq.desc_gpa()));
    // Avail and used both at descriptor 0 with their wrap counters at 1.
    EXPECT_EQ(a.seen->bases[i].index, i);
    EXPECT_EQ(a.seen->bases[i].num, 0x80008000u);
  }
  // The ring blocks are where the split ring's would be: the areas do not move.
  EXPECT_EQ(s.ring(1).pvq.desc_gpa(), 4096u);
  EXPECT_EQ(s.ring(0).area_gpa, 2u * 4096);
}

TEST(FrontendLayout, PackedAndInOrderNotOfferedMeansSplit) {
  Attempt a = attempt(kBase | kPacked | kInOrder, kBase);
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto& s = **a.session;
  EXPECT_EQ(s.layout(), RingLayout::split);
  EXPECT_FALSE(s.in_order());
  EXPECT_EQ(a.fake->set_features() & (kPacked | kInOrder), 0u);
  std::lock_guard lk(a.seen->mu);
  ASSERT_EQ(a.seen->bases.size(), 2u);
  EXPECT_EQ(a.seen->bases[0].num, 0u);
  EXPECT_EQ(a.seen->addrs[0].addr.avail_user_addr,
            reinterpret_cast<std::uint64_t>(s.memory().data()) + s.ring(0).vq.avail_gpa());
  EXPECT_FALSE(s.ring(0).packed);
}

TEST(FrontendLayout, InOrderOnTheSplitRing) {
  Attempt a = attempt(kBase | kInOrder, kBase | kPacked | kInOrder);
  ASSERT_TRUE(a.session) << a.session.error().message();
  EXPECT_EQ((*a.session)->layout(), RingLayout::split);
  EXPECT_TRUE((*a.session)->in_order());
}

// Not drivable: never acked even if wanted and offered (a driver that can't run packed).
TEST(FrontendLayout, PackedNeedsTheDriversSay) {
  auto pair = socketpair();
  ASSERT_TRUE(pair);
  FakeBackend fake(std::move(pair->second),
                   {.features = kBase | kPacked | virtio::bit(virtio::feature::protocol_features),
                    .protocol_features = kOfferedProtocol});
  FrontendOptions o;
  o.channel = std::move(pair->first);
  o.queue_size = 64;
  o.memory_size = 0;
  o.features = kBase | kPacked;
  o.drivable = kBase;
  auto s = FrontendSession::connect(std::move(o));
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ((*s)->layout(), RingLayout::split);
}

// GET_VRING_BASE on a packed ring carries 32 bits; positions past the ring are refused.
TEST(FrontendLayout, PackedVringBaseIsCheckedAgainstTheRing) {
  auto answer = [](std::uint32_t num) -> FakeBackend::Hook {
    return [num](Channel& ch, const Header&, const FrontendMessage& m) {
      const auto* g = std::get_if<GetVringBase>(&m);
      if (g == nullptr) return Action::normal;
      (void)ch.send(reply_vring_state(Request::get_vring_base, g->index, num));
      return Action::handled;
    };
  };
  {
    // Avail at 5 in the second lap, used at 3 in the first: a ring stopped with chains in flight.
    Attempt a = attempt(kBase | kPacked, kBase | kPacked, answer(0x80030005u));
    ASSERT_TRUE(a.session) << a.session.error().message();
    auto b = (*a.session)->stop();
    ASSERT_TRUE(b) << b.error().message();
    EXPECT_EQ(*b, (std::vector<std::uint32_t>{0x80030005u, 0x80030005u}));
  }
  {
    Attempt a = attempt(kBase | kPacked, kBase | kPacked, answer(0x80408000u));  // used 64
    ASSERT_TRUE(a.session) << a.session.error().message();
    auto b = (*a.session)->stop();
    ASSERT_FALSE(b);
    EXPECT_NE(b.error().message().find("is not on a ring of 64"), std::string::npos)
        << b.error().message();
  }
}

}  // namespace
}  // namespace vhostkit::vhost_user
