// Round trips through the codec: every request type encodes and decodes to the same values, with
// the fds it should carry.
#include "vhostkit/vhost_user/message.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>

#include "testing/fd_count.h"

namespace vhostkit::vhost_user {
namespace {

using vhostkit::testing::make_fd;
using vhostkit::testing::open_fd_count;
using vhostkit::testing::same_file;

// Encodes `m`, hands the codec duplicates of the encoded fds (as a socket would), decodes.
template <typename T>
T roundtrip(const T& m, std::uint32_t flags = 0) {
  auto out = encode(m, flags);
  EXPECT_TRUE(out.has_value()) << out.error().message();
  EXPECT_EQ(out->header.request, static_cast<std::uint32_t>(T::kRequest));
  EXPECT_EQ(out->header.version(), kVersion);
  EXPECT_FALSE(out->header.reply());
  FdList fds;
  for (int fd : out->fds()) EXPECT_TRUE(fds.push_back(UniqueFd(::dup(fd))));
  if constexpr (is_alternative<T, FrontendMessage>::value) {
    auto d = decode(out->header, out->payload(), std::move(fds));
    EXPECT_TRUE(d.has_value()) << d.error().message();
    EXPECT_EQ(request_of(*d), T::kRequest);
    return std::get<T>(std::move(*d));
  } else {
    auto d = decode_backend(out->header, out->payload(), std::move(fds));
    EXPECT_TRUE(d.has_value()) << d.error().message();
    EXPECT_EQ(request_of(*d), T::kRequest);
    return std::get<T>(std::move(*d));
  }
}

template <typename T>
void expect_no_payload() {
  auto out = encode(T{});
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 0u);
  EXPECT_EQ(out->fd_count, 0u);
  roundtrip(T{});
}

TEST(MessageRoundTrip, RequestsWithoutPayload) {
  expect_no_payload<GetFeatures>();
  expect_no_payload<SetOwner>();
  expect_no_payload<ResetOwner>();
  expect_no_payload<GetProtocolFeatures>();
  expect_no_payload<GetQueueNum>();
  expect_no_payload<PostcopyAdvise>();
  expect_no_payload<PostcopyListen>();
  expect_no_payload<PostcopyEnd>();
  expect_no_payload<ResetDevice>();
  expect_no_payload<GetMaxMemSlots>();
  expect_no_payload<GetStatus>();
  expect_no_payload<CheckDeviceState>();
  expect_no_payload<BackendConfigChange>();
}

template <typename T>
void expect_u64(std::uint64_t v) {
  T m;
  m.value = v;
  auto out = encode(m);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 8u);
  EXPECT_EQ(roundtrip(m).value, v);
}

TEST(MessageRoundTrip, U64Requests) {
  expect_u64<SetFeatures>(0x1'4000'0000ull);
  expect_u64<SetProtocolFeatures>(0x8fffull);
  expect_u64<NetSetMtu>(9000);
  expect_u64<SetStatus>(0xf);
  expect_u64<CloseCryptoSession>(~0ull);
}

template <typename T>
void expect_state(std::uint32_t index, std::uint32_t num) {
  T m;
  m.index = index;
  m.num = num;
  auto back = roundtrip(m);
  EXPECT_EQ(back.index, index);
  EXPECT_EQ(back.num, num);
}

TEST(MessageRoundTrip, VringStateRequests) {
  expect_state<SetVringNum>(1, 256);
  expect_state<SetVringBase>(3, 0xffff);
  expect_state<GetVringBase>(7, 0);
  expect_state<SetVringEnable>(2, 1);
  expect_state<SetVringEndian>(0, 1);
  expect_state<VringKick>(5, 0);
  expect_state<BackendVringCall>(4, 0);
  expect_state<BackendVringErr>(6, 0);
}

template <typename T>
void expect_vring_fd(std::uint8_t index) {
  const auto before = open_fd_count();
  {
    T with;
    with.index = index;
    with.fd = make_fd();
    auto out = encode(with);
    ASSERT_TRUE(out);
    EXPECT_EQ(out->fd_count, 1u);
    auto back = roundtrip(with);
    EXPECT_EQ(back.index, index);
    EXPECT_FALSE(back.nofd());
    EXPECT_TRUE(same_file(back.fd.get(), with.fd.get()));

    T without;
    without.index = index;
    auto out2 = encode(without);
    ASSERT_TRUE(out2);
    EXPECT_EQ(out2->fd_count, 0u);
    std::uint64_t u;
    std::memcpy(&u, out2->payload().data(), 8);
    EXPECT_EQ(u, index | kVringNoFdMask);
    auto back2 = roundtrip(without);
    EXPECT_EQ(back2.index, index);
    EXPECT_TRUE(back2.nofd());
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(MessageRoundTrip, VringFdRequests) {
  expect_vring_fd<SetVringKick>(0);
  expect_vring_fd<SetVringCall>(255);
  expect_vring_fd<SetVringErr>(17);
}

template <typename T>
void expect_fd_only() {
  T m;
  m.fd = make_fd();
  auto back = roundtrip(m);
  EXPECT_TRUE(same_file(back.fd.get(), m.fd.get()));
  // Without an fd there is nothing to send.
  auto bad = encode(T{});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
}

TEST(MessageRoundTrip, FdOnlyRequests) {
  expect_fd_only<SetLogFd>();
  expect_fd_only<SetBackendReqFd>();
  expect_fd_only<GpuSetSocket>();
}

TEST(MessageRoundTrip, SetMemTable) {
  const auto before = open_fd_count();
  {
    SetMemTable m;
    for (std::uint64_t i = 0; i < kMaxMemRegions; ++i) {
      m.regions.push_back(memory::RegionFd{{.guest_phys_addr = i << 30,
                                            .size = 0x1000 * (i + 1),
                                            .userspace_addr = 0x7f00'0000'0000 + (i << 32),
                                            .mmap_offset = i * 4096},
                                           make_fd()});
    }
    auto out = encode(m);
    ASSERT_TRUE(out);
    EXPECT_EQ(out->header.size, 8u + 8 * 32);
    EXPECT_EQ(out->fd_count, 8u);
    auto back = roundtrip(m);
    ASSERT_EQ(back.regions.size(), kMaxMemRegions);
    for (std::size_t i = 0; i < kMaxMemRegions; ++i) {
      EXPECT_EQ(back.regions[i].spec.guest_phys_addr, m.regions[i].spec.guest_phys_addr);
      EXPECT_EQ(back.regions[i].spec.size, m.regions[i].spec.size);
      EXPECT_EQ(back.regions[i].spec.userspace_addr, m.regions[i].spec.userspace_addr);
      EXPECT_EQ(back.regions[i].spec.mmap_offset, m.regions[i].spec.mmap_offset);
      EXPECT_TRUE(same_file(back.regions[i].fd.get(), m.regions[i].fd.get()));
    }
    // A smaller table is sent with only its regions.
    m.regions.resize(2);
    auto out2 = encode(m);
    ASSERT_TRUE(out2);
    EXPECT_EQ(out2->header.size, 8u + 2 * 32);
    EXPECT_EQ(roundtrip(m).regions.size(), 2u);
    // An empty table is legal.
    EXPECT_TRUE(roundtrip(SetMemTable{}).regions.empty());
    // Nine regions can't be encoded.
    m.regions.resize(9);
    auto bad = encode(m);
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().code, Errc::too_many);
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(MessageRoundTrip, SetLogBase) {
  SetLogBase m{.mmap_size = 1 << 20, .mmap_offset = 4096, .fd = make_fd()};
  auto out = encode(m);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 16u);
  auto back = roundtrip(m);
  EXPECT_EQ(back.mmap_size, m.mmap_size);
  EXPECT_EQ(back.mmap_offset, m.mmap_offset);
  EXPECT_TRUE(same_file(back.fd.get(), m.fd.get()));
}

TEST(MessageRoundTrip, SetVringAddr) {
  SetVringAddr m{.index = 1,
                 .addr = {.flags = virtio::kVhostVringFLog,
                          .desc_user_addr = 0x7f00'1000,
                          .used_user_addr = 0x7f00'3000,
                          .avail_user_addr = 0x7f00'2000,
                          .log_guest_addr = 0x4000'3000}};
  auto back = roundtrip(m);
  EXPECT_EQ(back.index, 1u);
  EXPECT_TRUE(back.addr.log_used());
  EXPECT_EQ(back.addr.desc_user_addr, m.addr.desc_user_addr);
  EXPECT_EQ(back.addr.used_user_addr, m.addr.used_user_addr);
  EXPECT_EQ(back.addr.avail_user_addr, m.addr.avail_user_addr);
  EXPECT_EQ(back.addr.log_guest_addr, m.addr.log_guest_addr);
}

TEST(MessageRoundTrip, SendRarp) {
  SendRarp m{.mac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56}};
  auto out = encode(m);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 8u);
  EXPECT_EQ(roundtrip(m).mac, m.mac);
}

TEST(MessageRoundTrip, Iotlb) {
  IotlbMsg m;
  m.iova = 0x1000;
  m.size = 0x2000;
  m.uaddr = 0x7f00'0000;
  m.perm = 3;
  m.type = 2;
  auto back = roundtrip(m);
  EXPECT_EQ(back.iova, m.iova);
  EXPECT_EQ(back.size, m.size);
  EXPECT_EQ(back.uaddr, m.uaddr);
  EXPECT_EQ(back.perm, 3);
  EXPECT_EQ(back.type, 2);
  BackendIotlbMsg miss;
  miss.iova = 0x5000;
  miss.perm = 1;
  miss.type = 1;
  auto bmiss = roundtrip(miss);
  EXPECT_EQ(bmiss.iova, 0x5000u);
  EXPECT_EQ(bmiss.type, 1);
}

TEST(MessageRoundTrip, Config) {
  GetConfig g{.offset = 0, .size = 12, .flags = 0};
  auto out = encode(g);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 12u + 12);
  auto gb = roundtrip(g);
  EXPECT_EQ(gb.size, 12u);

  SetConfig s{.offset = 6, .flags = wire::kConfigFlagLiveMigration, .data = {1, 2, 3, 4}};
  auto sb = roundtrip(s);
  EXPECT_EQ(sb.offset, 6u);
  EXPECT_EQ(sb.flags, wire::kConfigFlagLiveMigration);
  EXPECT_EQ(sb.data, s.data);

  s.data.assign(kMaxConfigSize, 0xab);
  EXPECT_EQ(roundtrip(s).data.size(), kMaxConfigSize);
  s.data.push_back(0);
  auto bad = encode(s);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::out_of_range);
}

TEST(MessageRoundTrip, Inflight) {
  GetInflightFd g{Inflight{.mmap_size = 0, .mmap_offset = 0, .num_queues = 2, .queue_size = 256}};
  auto out = encode(g);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 24u);
  auto gb = roundtrip(g);
  EXPECT_EQ(gb.inflight.num_queues, 2);
  EXPECT_EQ(gb.inflight.queue_size, 256);

  SetInflightFd s{
      Inflight{.mmap_size = 8192, .mmap_offset = 64, .num_queues = 4, .queue_size = 128},
      make_fd()};
  auto sb = roundtrip(s);
  EXPECT_EQ(sb.inflight.mmap_size, 8192u);
  EXPECT_EQ(sb.inflight.mmap_offset, 64u);
  EXPECT_EQ(sb.inflight.num_queues, 4);
  EXPECT_EQ(sb.inflight.queue_size, 128);
  EXPECT_TRUE(same_file(sb.fd.get(), s.fd.get()));
}

TEST(MessageRoundTrip, AddAndRemMemReg) {
  AddMemReg a{memory::RegionFd{{.guest_phys_addr = 0x1'0000'0000,
                                .size = 1 << 21,
                                .userspace_addr = 0x7f12'0000'0000,
                                .mmap_offset = 0},
                               make_fd()}};
  auto out = encode(a);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->header.size, 40u);
  auto ab = roundtrip(a);
  EXPECT_EQ(ab.region.spec.guest_phys_addr, a.region.spec.guest_phys_addr);
  EXPECT_EQ(ab.region.spec.size, a.region.spec.size);
  EXPECT_TRUE(same_file(ab.region.fd.get(), a.region.fd.get()));

  RemMemReg r{a.region.spec};
  auto rb = roundtrip(r);
  EXPECT_EQ(rb.spec.guest_phys_addr, r.spec.guest_phys_addr);
  EXPECT_EQ(rb.spec.userspace_addr, r.spec.userspace_addr);
}

TEST(MessageRoundTrip, SharedObjectsAndDeviceState) {
  Uuid u{};
  for (std::size_t i = 0; i < u.size(); ++i) u[i] = static_cast<std::uint8_t>(i * 7);
  EXPECT_EQ(roundtrip(GetSharedObject{u}).uuid, u);
  EXPECT_EQ(roundtrip(BackendSharedObjectAdd{u}).uuid, u);
  EXPECT_EQ(roundtrip(BackendSharedObjectRemove{u}).uuid, u);
  EXPECT_EQ(roundtrip(BackendSharedObjectLookup{u}).uuid, u);

  SetDeviceStateFd d{.direction = 1, .phase = 0, .fd = make_fd()};
  auto db = roundtrip(d);
  EXPECT_EQ(db.direction, 1u);
  EXPECT_TRUE(same_file(db.fd.get(), d.fd.get()));
}

TEST(MessageRoundTrip, HostNotifier) {
  BackendVringHostNotifier m;
  m.index = 3;
  m.size = 4096;
  m.offset = 8192;
  m.fd = make_fd();
  auto b = roundtrip(m);
  EXPECT_EQ(b.index, 3);
  EXPECT_EQ(b.size, 4096u);
  EXPECT_EQ(b.offset, 8192u);
  EXPECT_TRUE(same_file(b.fd.get(), m.fd.get()));
  BackendVringHostNotifier remove;
  remove.index = 3;
  EXPECT_FALSE(roundtrip(remove).fd.valid());
}

TEST(MessageRoundTrip, NeedReplyFlagIsKept) {
  auto out = encode(SetFeatures{.value = 1}, kNeedReplyFlag);
  ASSERT_TRUE(out);
  EXPECT_TRUE(out->header.need_reply());
  EXPECT_EQ(out->header.version(), kVersion);
  // The variant overload encodes the same bytes.
  auto out2 = encode(FrontendMessage(SetFeatures{.value = 1}), kNeedReplyFlag);
  ASSERT_TRUE(out2);
  EXPECT_EQ(std::memcmp(&out->header, &out2->header, sizeof(Header)), 0);
  EXPECT_EQ(std::memcmp(out->payload().data(), out2->payload().data(), 8), 0);
}

// Replies: encode on one side, decode on the other.
Received as_received(const OutMessage& out) {
  Received r;
  r.header = out.header;
  std::memcpy(r.payload_buf.data(), out.payload().data(), out.payload().size());
  for (int fd : out.fds()) r.fds.push_back(UniqueFd(::dup(fd)));
  return r;
}

TEST(MessageReplies, U64AndAck) {
  auto r = as_received(reply_u64(Request::get_features, 0x1'7000'0000ull));
  EXPECT_TRUE(r.header.reply());
  auto v = decode_u64_reply(r, Request::get_features);
  ASSERT_TRUE(v) << v.error().message();
  EXPECT_EQ(*v, 0x1'7000'0000ull);

  auto ok = decode_u64_reply(as_received(reply_ack(Request::set_mem_table, true)),
                             Request::set_mem_table);
  ASSERT_TRUE(ok);
  EXPECT_EQ(*ok, 0u);
  auto nok = decode_u64_reply(as_received(reply_ack(Request::set_mem_table, false)),
                              Request::set_mem_table);
  ASSERT_TRUE(nok);
  EXPECT_NE(*nok, 0u);

  auto slots = decode_u64_reply(as_received(reply_u64(Request::get_max_mem_slots, 509)),
                                Request::get_max_mem_slots);
  ASSERT_TRUE(slots);
  EXPECT_EQ(*slots, 509u);

  auto backend = decode_u64_reply(as_received(reply_u64(BackendRequest::iotlb_msg, 0)),
                                  BackendRequest::iotlb_msg);
  ASSERT_TRUE(backend);
}

TEST(MessageReplies, WrongReplyIsRejected) {
  auto r = as_received(reply_u64(Request::get_features, 1));
  auto v = decode_u64_reply(r, Request::get_protocol_features);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().detail.find("GET_FEATURES"), std::string::npos) << v.error().detail;
  // A request is not a reply.
  auto req = encode(GetFeatures{});
  ASSERT_TRUE(req);
  EXPECT_FALSE(decode_u64_reply(as_received(*req), Request::get_features));
}

TEST(MessageReplies, VringState) {
  auto v = decode_vring_state_reply(as_received(reply_vring_state(Request::get_vring_base, 1, 77)),
                                    Request::get_vring_base);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->index, 1u);
  EXPECT_EQ(v->num, 77u);
}

TEST(MessageReplies, Config) {
  const std::uint8_t cfg[] = {0x52, 0x54, 0, 1, 2, 3, 1, 0};
  auto c = decode_config_reply(as_received(reply_config(0, 0, cfg)));
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->data, std::vector<std::uint8_t>(std::begin(cfg), std::end(cfg)));
  auto failed = decode_config_reply(as_received(reply_config(0, 0, {})));
  ASSERT_TRUE(failed);
  EXPECT_TRUE(failed->data.empty());
}

TEST(MessageReplies, Inflight) {
  const auto before = open_fd_count();
  {
    auto fd = make_fd();
    Inflight in{.mmap_size = 4096, .mmap_offset = 0, .num_queues = 2, .queue_size = 256};
    auto r = decode_inflight_reply(as_received(reply_inflight(in, fd.get())));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->inflight.mmap_size, 4096u);
    EXPECT_EQ(r->inflight.queue_size, 256);
    EXPECT_TRUE(same_file(r->fd.get(), fd.get()));
    auto nofd = decode_inflight_reply(as_received(reply_inflight(in, -1)));
    EXPECT_FALSE(nofd);
    // "No region": mmap_size 0 and no fd; with an fd it is malformed.
    Inflight none{.mmap_size = 0, .mmap_offset = 0, .num_queues = 2, .queue_size = 256};
    auto empty = decode_inflight_reply(as_received(reply_inflight(none, -1)));
    ASSERT_TRUE(empty) << empty.error().message();
    EXPECT_EQ(empty->inflight.mmap_size, 0u);
    EXPECT_FALSE(empty->fd.valid());
    EXPECT_FALSE(decode_inflight_reply(as_received(reply_inflight(none, fd.get()))));
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(MessageNames, RequestsHaveSpecNames) {
  EXPECT_EQ(to_string(Request::set_vring_num), "SET_VRING_NUM");
  EXPECT_EQ(to_string(Request::check_device_state), "CHECK_DEVICE_STATE");
  EXPECT_EQ(to_string(BackendRequest::vring_call), "BACKEND_VRING_CALL");
  EXPECT_EQ(to_string(static_cast<Request>(99)), "unknown request");
}

TEST(MessageErrors, SaySizeAndExpectation) {
  const std::uint8_t four[4] = {};
  Header h{
      .request = static_cast<std::uint32_t>(Request::set_vring_num), .flags = kVersion, .size = 4};
  auto d = decode(h, four, FdList{});
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().detail, "SET_VRING_NUM payload is 4 bytes, expected 8");
}

}  // namespace
}  // namespace vhostkit::vhost_user
