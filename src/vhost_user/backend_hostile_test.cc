// A hostile front-end against BackendSession: malformed messages of every kind. Each case
// checks that the session survives (request-level error: refused, serving goes on) or closes
// cleanly (stream-level error), that a well-behaved front-end can negotiate and move traffic
// on the same device afterwards, and that no fd is left behind. Bad memory tables are in
// backend_memtable_hostile_test.cc; the rig is testing/backend_hostile_rig.h.
#include "testing/backend_hostile_rig.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using namespace hostile_rig;

// ---- framing and header -----------------------------------------------------------------

TEST(BackendHostile, ShortPayloadIsRefused) {
  hostile([](Hostile& h) {
    ASSERT_NO_FATAL_FAILURE(h.fe->handshake());
    const std::uint32_t four = 64;
    h.raw(Request::set_vring_num, kNeedReplyFlag, bytes_of(four));
    EXPECT_NE(h.ack(Request::set_vring_num), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, OversizePayloadIsRefused) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    std::array<std::uint8_t, 64> big{};
    h.raw(Request::set_features, kNeedReplyFlag, big);
    EXPECT_NE(h.ack(Request::set_features), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, SizeOverAnyMessageClosesTheConnection) {
  hostile([](Hostile& h) {
    Header hd{static_cast<std::uint32_t>(Request::set_features), kVersion, 100000};
    ASSERT_TRUE(send_raw(h.sock(), hd, {}));
    h.last = h.session->serve_one();
    ASSERT_FALSE(h.last);
    EXPECT_EQ(h.last.error().code, Errc::broken);
    h.expect_closed();
  });
}

TEST(BackendHostile, WrongVersionClosesTheConnection) {
  hostile([](Hostile& h) {
    Header hd{static_cast<std::uint32_t>(Request::get_features), 2, 0};
    ASSERT_TRUE(send_raw(h.sock(), hd, {}));
    h.last = h.session->serve_one();
    h.expect_closed();
  });
}

TEST(BackendHostile, ReplyFlagFromTheFrontendIsRefused) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const std::uint64_t v = 0;
    h.raw(Request::set_features, kReplyFlag | kNeedReplyFlag, bytes_of(v));
    EXPECT_NE(h.ack(Request::set_features), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, HalfAMessageThenHangUp) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    Header hd{static_cast<std::uint32_t>(Request::set_features), kVersion, 8};
    const std::uint32_t half = 0;
    std::array<std::uint8_t, sizeof(Header) + 4> buf{};
    std::memcpy(buf.data(), &hd, sizeof hd);
    std::memcpy(buf.data() + sizeof hd, &half, 4);
    ASSERT_EQ(::send(h.sock(), buf.data(), buf.size(), MSG_NOSIGNAL), (ssize_t)buf.size());
    h.fe->disconnect();
    h.last = h.session->serve_one();
    ASSERT_FALSE(h.last);
    EXPECT_EQ(h.last.error().code, Errc::disconnected);
    h.session->close();
  });
}

TEST(BackendHostile, HalfAMessageThenStallClosesAfterTheTimeout) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    Header hd{static_cast<std::uint32_t>(Request::set_features), kVersion, 8};
    ASSERT_EQ(::send(h.sock(), &hd, sizeof hd, MSG_NOSIGNAL), (ssize_t)sizeof hd);
    h.last = h.session->serve_one();  // waits the channel timeout (1 s) for the payload
    ASSERT_FALSE(h.last);
    EXPECT_EQ(h.last.error().code, Errc::broken);
    h.expect_closed();
  });
}

TEST(BackendHostile, UnknownRequestIsRefused) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    h.raw(static_cast<Request>(99), kNeedReplyFlag, {});
    EXPECT_NE(h.ack(static_cast<Request>(99)), 0u);
    h.raw(static_cast<Request>(0xffffffff), 0, {});
    EXPECT_TRUE(h.quiet());
    h.expect_alive();
  });
}

TEST(BackendHostile, FloodOfBadRequestsIsCountedNotFatal) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const auto before = h.session->stats().failed;
    for (int i = 0; i < 1000; ++i) {
      ASSERT_TRUE(h.fe->request(SetVringNum{7, 64}, false));
    }
    EXPECT_EQ(h.session->stats().failed - before, 1000u);
    h.expect_alive();
  });
}

// ---- fds --------------------------------------------------------------------------------

// Nine eventfds: one more than a message may carry.
struct NineFds {
  std::vector<UniqueFd> owned;
  std::vector<int> raw;
  NineFds() {
    for (int i = 0; i < 9; ++i) {
      owned.push_back(test::make_eventfd());
      raw.push_back(owned.back().get());
    }
  }
};

TEST(BackendHostile, NineFdsAreAllClosed) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const NineFds nine;
    const std::vector<int>& raw = nine.raw;
    const std::uint64_t v = 0;
    h.raw(Request::set_vring_kick, 0, bytes_of(v), raw);
    EXPECT_TRUE(h.last);
    EXPECT_EQ(h.session->last_error().code, Errc::too_many);
    h.expect_alive();
  });
}

// With NEED_REPLY, too many fds still get an answer: the header survives, the fds do not.
TEST(BackendHostile, NineFdsWithNeedReplyAreRefusedWithAnAck) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const NineFds nine;
    const std::vector<int>& raw = nine.raw;
    const std::size_t fds_before = vhostkit::testing::open_fd_count();
    const std::uint64_t v = 0;
    h.raw(Request::set_vring_call, kNeedReplyFlag, bytes_of(v), raw);
    EXPECT_TRUE(h.last);
    EXPECT_NE(h.ack(Request::set_vring_call), 0u);
    EXPECT_EQ(h.session->last_error().code, Errc::too_many);
    EXPECT_EQ(vhostkit::testing::open_fd_count(), fds_before);
    h.expect_alive();
  });
}

TEST(BackendHostile, FdOnARequestThatTakesNone) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    UniqueFd fd = test::make_eventfd();
    const int raw = fd.get();
    const wire::VringState st{0, 64};
    h.raw(Request::set_vring_num, kNeedReplyFlag, bytes_of(st), {&raw, 1});
    EXPECT_NE(h.ack(Request::set_vring_num), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, KickWithoutFdOrNoFdBit) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const std::uint64_t v = 0;  // index 0, "no fd" not set, and no fd attached
    h.raw(Request::set_vring_kick, kNeedReplyFlag, bytes_of(v));
    EXPECT_NE(h.ack(Request::set_vring_kick), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, CallWithTwoFds) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    UniqueFd a = test::make_eventfd(), b = test::make_eventfd();
    const int raw[2] = {a.get(), b.get()};
    const std::uint64_t v = 0;
    h.raw(Request::set_vring_call, kNeedReplyFlag, bytes_of(v), raw);
    EXPECT_NE(h.ack(Request::set_vring_call), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, KickNoFdBitWithAnFd) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    UniqueFd a = test::make_eventfd();
    const int raw = a.get();
    const std::uint64_t v = kVringNoFdMask;
    h.raw(Request::set_vring_kick, kNeedReplyFlag, bytes_of(v), {&raw, 1});
    EXPECT_NE(h.ack(Request::set_vring_kick), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, KickFdThatIsASocketHangingUp) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->negotiate());
    // Ring 0's err fd, set first, so the ring breaking is seen as it happens.
    UniqueFd err = test::make_eventfd();
    SetVringErr e;
    e.index = 0;
    e.fd = UniqueFd(::fcntl(err.get(), F_DUPFD_CLOEXEC, 0));
    ASSERT_TRUE(h.fe->ok(e));
    // A "kick fd" that is a socket whose peer is gone: readable forever, yields EOF. It is a
    // valid fd, so the request is accepted; serving it would spin the worker, so the ring must
    // break instead: stopped, flagged, and its err fd signalled.
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    ::close(sv[1]);
    SetVringKick k;
    k.index = 0;
    k.fd = UniqueFd(sv[0]);
    auto a = h.fe->request(k, true);
    ASSERT_TRUE(a.has_value()) << a.error().message();
    EXPECT_EQ(*a, 0u);
    // Generous: the worker normally sees the hang-up within a millisecond.
    pollfd p{err.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 20000), 1) << "the err fd was not signalled";
    EXPECT_TRUE(h.device.queue(0).broken());
    EXPECT_TRUE(h.device.broken());
    EXPECT_FALSE(h.device.queue(0).started());
    // The other ring goes on, and so does the session.
    auto echoed = h.fe->echo(1, 200, 3, 20s);
    EXPECT_TRUE(echoed.has_value()) << echoed.error().message();
    EXPECT_FALSE(h.device.queue(1).broken());
    h.expect_alive();
  });
}

TEST(BackendHostile, RemMemRegWithAStrayFdIsTolerated) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    AddMemReg add;
    add.region = memory::RegionFd{h.fe->region(), h.fe->dup_memfd()};
    ASSERT_TRUE(h.fe->ok(add));
    UniqueFd stray = test::make_eventfd();
    const int raw = stray.get();
    wire::SingleMemoryRegion w{};
    w.region = {h.fe->region().guest_phys_addr, h.fe->region().size, h.fe->region().userspace_addr,
                0};
    h.raw(Request::rem_mem_reg, kNeedReplyFlag, bytes_of(w), {&raw, 1});
    EXPECT_EQ(h.ack(Request::rem_mem_reg), 0u);
    EXPECT_EQ(h.device.memory().region_count(), 0u);
    h.expect_alive();
  });
}

// ---- rings ------------------------------------------------------------------------------

struct RingCase {
  const char* name;
  std::function<void(Hostile&)> send;  // must be refused
  const char* refusal = nullptr;       // in the session's last error, when given
};

class BadRing : public ::testing::TestWithParam<RingCase> {};

TEST_P(BadRing, IsRefusedAndServingGoesOn) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    ASSERT_TRUE(h.fe->set_mem_table());
    GetParam().send(h);
    h.expect_alive();
  });
}

SetVringAddr addr_for(Hostile& h, std::uint32_t index, std::uint64_t desc_off = 0) {
  SetVringAddr a;
  a.index = index;
  a.addr.desc_user_addr = h.fe->uva_base() + desc_off;
  a.addr.avail_user_addr = h.fe->uva_base() + 0x2000;
  a.addr.used_user_addr = h.fe->uva_base() + 0x3000;
  return a;
}

SetVringKick kick_for(std::uint8_t index) {
  SetVringKick k;
  k.index = index;
  k.fd = test::make_eventfd();
  return k;
}

const RingCase kRingCases[] = {
    {"NumIndexOutOfRange", [](Hostile& h) { h.expect_refused(SetVringNum{2, 64}); }},
    {"NumIndexHuge", [](Hostile& h) { h.expect_refused(SetVringNum{0xffffffff, 64}); }},
    {"AddrIndexOutOfRange", [](Hostile& h) { h.expect_refused(addr_for(h, 5)); }},
    {"BaseIndexOutOfRange", [](Hostile& h) { h.expect_refused(SetVringBase{2, 0}); }},
    {"BaseOver16Bits", [](Hostile& h) { h.expect_refused(SetVringBase{0, 0x10000}); }},
    {"KickIndexOutOfRange", [](Hostile& h) { h.expect_refused(kick_for(200)); }},
    {"CallIndexOutOfRange",
     [](Hostile& h) {
       SetVringCall c;
       c.index = 2;
       c.fd = test::make_eventfd();
       h.expect_refused(c);
     }},
    {"ErrIndexOutOfRange",
     [](Hostile& h) {
       SetVringErr c;
       c.index = 255;
       h.expect_refused(c);
     }},
    {"EnableIndexOutOfRange", [](Hostile& h) { h.expect_refused(SetVringEnable{9, 1}); }},
    {"EnableStateNotBoolean", [](Hostile& h) { h.expect_refused(SetVringEnable{0, 7}); }},
    {"GetVringBaseIndexOutOfRange",
     [](Hostile& h) {
       // Its reply has a body; the failure comes back as a non-zero u64 whatever the flags.
       ASSERT_TRUE(h.fe->channel().send_message(GetVringBase{3, 0}));
       h.last = h.session->serve_one();
       EXPECT_NE(h.ack(Request::get_vring_base), 0u);
     }},
    {"SizeZero", [](Hostile& h) { h.expect_refused(SetVringNum{0, 0}); }},
    {"SizeNotPowerOfTwo", [](Hostile& h) { h.expect_refused(SetVringNum{0, 100}); }},
    {"SizeTooLarge", [](Hostile& h) { h.expect_refused(SetVringNum{0, 65536}); }},
    {"AddrMisaligned", [](Hostile& h) { h.expect_refused(addr_for(h, 0, 8)); }},
    {"AddrUnmapped",
     [](Hostile& h) {
       ASSERT_TRUE(h.fe->ok(SetVringNum{0, 64}));
       auto a = addr_for(h, 0);
       a.addr.desc_user_addr = 0x10;
       h.expect_refused(a);
     }},
    {"AddrRingPastRegionEnd",
     [](Hostile& h) {
       ASSERT_TRUE(h.fe->ok(SetVringNum{0, 256}));
       h.expect_refused(addr_for(h, 0, TestFrontend::kMemSize - 16));
     }},
};

INSTANTIATE_TEST_SUITE_P(BackendHostile, BadRing, ::testing::ValuesIn(kRingCases),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- before SET_OWNER -------------------------------------------------------------------

class BeforeOwner : public ::testing::TestWithParam<RingCase> {};

TEST_P(BeforeOwner, IsRefused) {
  hostile([](Hostile& h) {
    ASSERT_NO_FATAL_FAILURE(h.protocol_only());
    GetParam().send(h);
    EXPECT_FALSE(h.device.has_owner());
    // The owner check lives in vhost::Device, in the words of the request that met it.
    if (GetParam().refusal != nullptr) {
      EXPECT_EQ(h.session->last_error().detail, GetParam().refusal);
    }
    h.expect_alive();
  });
}

const RingCase kBeforeOwner[] = {
    {"SetMemTable",
     [](Hostile& h) {
       SetMemTable t;
       t.regions.push_back(memory::RegionFd{h.fe->region(), h.fe->dup_memfd()});
       h.expect_refused(t);
     },
     "SET_MEM_TABLE before SET_OWNER"},
    {"SetVringNum", [](Hostile& h) { h.expect_refused(SetVringNum{0, 64}); },
     "SET_VRING_NUM before SET_OWNER"},
    {"SetVringAddr", [](Hostile& h) { h.expect_refused(addr_for(h, 0)); },
     "SET_VRING_ADDR before SET_OWNER"},
    {"SetVringBase", [](Hostile& h) { h.expect_refused(SetVringBase{0, 0}); },
     "SET_VRING_BASE before SET_OWNER"},
    {"SetVringKick", [](Hostile& h) { h.expect_refused(kick_for(0)); },
     "SET_VRING_KICK before SET_OWNER"},
    {"SetVringEnableOn", [](Hostile& h) { h.expect_refused(SetVringEnable{0, 1}); },
     "SET_VRING_ENABLE before SET_OWNER"},
    {"SetLogFd",
     [](Hostile& h) {
       SetLogFd m;
       m.fd = test::make_eventfd();
       h.expect_refused(m);
     },
     "SET_LOG_FD before SET_OWNER"},
    {"ResetOwner", [](Hostile& h) { h.expect_refused(ResetOwner{}); },
     "RESET_OWNER before SET_OWNER"},
    {"ResetDevice", [](Hostile& h) { h.expect_refused(ResetDevice{}); },
     "RESET_DEVICE before SET_OWNER"},
    {"AddMemReg",
     [](Hostile& h) {
       AddMemReg m;
       m.region = memory::RegionFd{h.fe->region(), h.fe->dup_memfd()};
       h.expect_refused(m);
     },
     "ADD_MEM_REG before SET_OWNER"},
    {"SetConfig",
     [](Hostile& h) {
       SetConfig m;
       m.offset = 8;
       m.data = {1};
       h.expect_refused(m);
     },
     "SET_CONFIG before SET_OWNER"},
    {"SetStatus", [](Hostile& h) { h.expect_refused(SetStatus{1}); },
     "SET_STATUS before SET_OWNER"},
    {"SendRarp", [](Hostile& h) { h.expect_refused(SendRarp{}); }, "SEND_RARP before SET_OWNER"},
    {"GetVringBaseOutOfRange",
     [](Hostile& h) {
       ASSERT_TRUE(h.fe->channel().send_message(GetVringBase{77, 0}));
       h.last = h.session->serve_one();
       EXPECT_NE(h.ack(Request::get_vring_base), 0u);
     }},
};

INSTANTIATE_TEST_SUITE_P(BackendHostile, BeforeOwner, ::testing::ValuesIn(kBeforeOwner),
                         [](const auto& info) { return std::string(info.param.name); });

// Without PROTOCOL_FEATURES a kick also enables its ring; an index out of range is still the
// kick's refusal, made by the device in the kick's words.
TEST(BackendHostile, KickIndexOutOfRangeWithoutProtocolFeatures) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->channel().send_message(SetOwner{}));
    h.last = h.session->serve_one();
    ASSERT_TRUE(h.device.has_owner());
    ASSERT_TRUE(h.fe->channel().send_message(kick_for(9)));
    h.last = h.session->serve_one();
    EXPECT_EQ(h.session->stats().failed, 1u);
    EXPECT_EQ(h.session->last_error().detail,
              "SET_VRING_KICK: vring index 9 out of range (device has 2 queues)");
    h.expect_alive();
  });
}

// SET_FEATURES without SET_OWNER (a reconnecting DPDK virtio-user) makes the sender the owner;
// the features are checked as always. A SET_OWNER after that (front-ends that send it after
// SET_FEATURES) is accepted as the one it stood in for; a second one is refused.
TEST(BackendHostile, SetFeaturesWithoutSetOwnerStartsTheSession) {
  hostile([](Hostile& h) {
    ASSERT_NO_FATAL_FAILURE(h.protocol_only());
    auto bad = h.fe->request(SetFeatures{~std::uint64_t{0}}, true);
    ASSERT_TRUE(bad.has_value());
    EXPECT_NE(*bad, 0u);  // bits we never offered: refused, but the session has begun
    EXPECT_TRUE(h.device.has_owner());
    EXPECT_TRUE(h.fe->ok(SetFeatures{h.device.offered_features()}));
    EXPECT_TRUE(h.fe->ok(SetOwner{}));
    EXPECT_TRUE(h.device.has_owner());
    auto again = h.fe->request(SetOwner{}, true);
    ASSERT_TRUE(again.has_value());
    EXPECT_NE(*again, 0u);
    h.expect_alive();
  });
}

// DPDK's virtio-user reconnecting to a restarted back-end, with no SET_OWNER: it stops every ring
// (SET_VRING_ENABLE 0, GET_VRING_BASE), hands over the call fds, then SET_FEATURES. All of it is
// answered as for a fresh device; a ring still cannot be turned on before the session starts.
TEST(BackendHostile, DpdkReconnectOrderBeforeSetOwner) {
  hostile([](Hostile& h) {
    ASSERT_NO_FATAL_FAILURE(h.protocol_only());
    for (std::uint32_t i = 0; i < h.device.num_queues(); ++i) {
      EXPECT_TRUE(h.fe->ok(SetVringEnable{i, 0})) << "ring " << i;
      ASSERT_TRUE(h.fe->channel().send_message(GetVringBase{i, 0}));
      h.last = h.session->serve_one();
      EXPECT_EQ(h.ack(Request::get_vring_base), i);  // the state {index i, base 0} as a u64
    }
    for (std::uint32_t i = 0; i < h.device.num_queues(); ++i) {
      SetVringCall c;
      c.index = i;
      c.fd = test::make_eventfd();
      EXPECT_TRUE(h.fe->ok(c)) << "ring " << i;
    }
    EXPECT_FALSE(h.device.has_owner());
    SetVringCall out;
    out.index = 200;
    out.fd = test::make_eventfd();
    auto a = h.fe->request(out, true);
    ASSERT_TRUE(a.has_value());
    EXPECT_NE(*a, 0u);  // still range-checked
    EXPECT_TRUE(h.fe->ok(SetFeatures{h.device.offered_features()}));
    EXPECT_TRUE(h.device.has_owner());
    h.expect_alive();
  });
}

// ---- everything else --------------------------------------------------------------------

TEST(BackendHostile, SetOwnerTwice) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    h.expect_refused(SetOwner{});
  });
}

TEST(BackendHostile, SetFeaturesNotOffered) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    h.expect_refused(SetFeatures{virtio::bit(virtio::feature::ring_packed)});
  });
}

TEST(BackendHostile, SetProtocolFeaturesNotOffered) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const auto before = h.session->protocol_features();
    ASSERT_TRUE(h.fe->request(SetProtocolFeatures{~std::uint64_t{0}}, false));
    EXPECT_EQ(h.session->protocol_features(), before);
    h.expect_alive();
  });
}

TEST(BackendHostile, SetLogBasePastTheFile) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    SetLogBase m;
    m.mmap_size = 1 << 20;
    m.mmap_offset = 1ull << 40;
    m.fd = h.fe->dup_memfd();
    ASSERT_TRUE(h.fe->channel().send_message(m));
    h.last = h.session->serve_one();
    EXPECT_NE(h.ack(Request::set_log_base), 0u);
    h.expect_alive();
  });
}

TEST(BackendHostile, GetConfigOversize) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    const wire::Config c{0, 1000, 0, {}};
    h.raw(Request::get_config, 0,
          std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(&c),
                                        wire::kConfigHeaderSize));
    auto rep = h.fe->channel().recv();
    ASSERT_TRUE(rep);
    auto cfg = decode_config_reply(*rep);
    ASSERT_TRUE(cfg);
    EXPECT_TRUE(cfg->data.empty());
    h.expect_alive();
  });
}

TEST(BackendHostile, SetConfigPastTheEnd) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    SetConfig m;
    m.offset = 0xfffffff0;
    m.data.assign(32, 1);
    h.expect_refused(m);
  });
}

TEST(BackendHostile, NetSetMtuWithoutTheFeature) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    h.expect_refused(NetSetMtu{1500});
  });
}

TEST(BackendHostile, UnsupportedRequestsWithFds) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    SetBackendReqFd m;
    m.fd = test::make_eventfd();
    h.expect_refused(m);
    SetInflightFd inf;
    inf.fd = h.fe->dup_memfd();
    h.expect_refused(inf);
    GpuSetSocket g;
    g.fd = test::make_eventfd();
    h.expect_refused(g);
  });
}

TEST(BackendHostile, UnsupportedRequestsWithOwnRepliesStillGetOne) {
  hostile([](Hostile& h) {
    ASSERT_TRUE(h.fe->handshake());
    for (auto r : {Request::iotlb_msg, Request::check_device_state}) {
      if (r == Request::iotlb_msg) {
        ASSERT_TRUE(h.fe->channel().send_message(IotlbMsg{}));
      } else {
        ASSERT_TRUE(h.fe->channel().send_message(CheckDeviceState{}));
      }
      h.last = h.session->serve_one();
      EXPECT_NE(h.ack(r), 0u) << to_string(r);
    }
    h.expect_alive();
  });
}

TEST(BackendHostile, FdCountStableOver1000Cycles) { test::fd_stable_over_cycles(1000); }

}  // namespace
}  // namespace vhostkit::vhost_user
