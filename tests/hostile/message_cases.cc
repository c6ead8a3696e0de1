// Bad vhost-user messages: framing, indices, ring sizes, fds, memory tables, order.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "cases.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/virtio/features.h"

namespace vhostkit::hostile {

using namespace vhost_user;
using namespace std::chrono_literals;

// How long a stalled or oversized message may keep its session: the back-end's socket timeout is
// 1 s; the rest is room for a loaded host. The failure this catches is a session kept for good.
constexpr auto kStallClose = 10000ms;

const char* to_string(Target t) noexcept { return t == Target::net ? "net" : "blk"; }

namespace {

using Outcome = Result<std::string>;

// A request a correct back-end must not accept: refused, or the connection dropped.
Outcome must_refuse(Answer a, std::string_view what) {
  if (a == Answer::nack || a == Answer::closed) return std::string(to_string(a));
  return fail(Errc::invalid_argument, fmt::format("{}: {}", what, to_string(a)));
}

// Several requests that must all be refused; the outcome names them once.
Outcome all_refused(std::initializer_list<std::pair<Answer, std::string>> answers) {
  std::string out;
  for (const auto& [a, what] : answers) {
    auto r = must_refuse(a, what);
    if (!r) return r;
    if (out.find(*r) == std::string::npos) out += (out.empty() ? "" : "/") + *r;
    if (a == Answer::closed) break;  // nothing after a hang-up is heard
  }
  return out;
}

// Whatever the back-end does is allowed (the protocol leaves it open); we report it.
Outcome any(Answer a) { return std::string(to_string(a)); }

Result<> up(RawPeer& p) { return p.handshake(); }

// More than 8 fds: the channel closes them all and the session refuses the message; since the
// header survives, a NEED_REPLY gets its failure ack. Then the session still serves.
Outcome too_many_fds(RawPeer& p, Answer a) {
  if (a == Answer::ack) return fail(Errc::invalid_argument, "accepted");
  if (a == Answer::closed) return std::string("closed");
  if (a != Answer::nack)
    return fail(Errc::invalid_argument, fmt::format("{}, not refused", to_string(a)));
  auto f = p.get_u64(Request::get_features);
  if (!f) return fail(Errc::broken, "session no longer answers: " + f.error().message());
  return fmt::format("{}, serves on", to_string(a));
}

Header hdr(Request r, std::uint32_t flags, std::uint32_t size) {
  return Header{static_cast<std::uint32_t>(r), flags, size};
}

// GET_VRING_BASE has its own reply: a u64 of 1 says it failed, a vring state that it worked.
Answer get_vring_base_answer(RawPeer& p, std::uint32_t index) {
  wire::VringState s{index, 0};
  if (!p.send_raw(hdr(Request::get_vring_base, kVersion, sizeof s), bytes_of(s)))
    return Answer::closed;
  auto rep = p.channel().recv();
  if (!rep) return rep.error().code == Errc::would_block ? Answer::silent : Answer::closed;
  auto v = decode_u64_reply(*rep, Request::get_vring_base);
  if (!v) return Answer::silent;
  return *v == 1 ? Answer::nack : Answer::ack;
}

// An index out of range in a vring-state message, at several sizes.
Outcome vring_state_indices(RawPeer& p, Target t, Request r, std::uint32_t num) {
  if (auto u = up(p); !u) return std::unexpected(u.error());
  std::string out;
  for (std::uint32_t idx : {queues_of(t), 255u, 0x10000u, 0x7fffffffu, 0xffffffffu}) {
    wire::VringState s{idx, num};
    auto o = must_refuse(p.raw_request(r, bytes_of(s)), fmt::format("index {}", idx));
    if (!o) return o;
    out = *o;
    if (*o == "closed") break;
  }
  return out;
}

// An index out of range in SET_VRING_KICK/CALL/ERR (the u64's low byte), fd attached.
Outcome vring_fd_indices(RawPeer& p, Target t, Request r) {
  if (auto u = up(p); !u) return std::unexpected(u.error());
  std::string out;
  for (std::uint64_t idx : {std::uint64_t{queues_of(t)}, std::uint64_t{255}}) {
    UniqueFd fd = make_eventfd();
    const int fds[1] = {fd.get()};
    auto o = must_refuse(p.raw_request(r, bytes_of(idx), fds), fmt::format("index {}", idx));
    if (!o) return o;
    out = *o;
    if (*o == "closed") break;
  }
  return out;
}

wire::MemoryRegion wreg(std::uint64_t gpa, std::uint64_t size, std::uint64_t uva,
                        std::uint64_t off) {
  return wire::MemoryRegion{gpa, size, uva, off};
}

// A SET_MEM_TABLE of `regions`, each with its own dup of the peer's memfd (or `fds` if given).
Answer mem_table(RawPeer& p, std::span<const wire::MemoryRegion> regions,
                 std::uint32_t nregions_field, std::span<const int> fds_override = {},
                 bool use_override = false) {
  std::vector<std::uint8_t> payload(wire::kMemoryHeaderSize +
                                    regions.size() * sizeof(wire::MemoryRegion));
  const std::uint32_t head[2] = {nregions_field, 0};
  std::memcpy(payload.data(), head, sizeof head);
  std::memcpy(payload.data() + wire::kMemoryHeaderSize, regions.data(),
              regions.size() * sizeof(wire::MemoryRegion));
  std::vector<UniqueFd> owned;
  std::vector<int> fds;
  if (use_override) {
    fds.assign(fds_override.begin(), fds_override.end());
  } else {
    for (std::size_t i = 0; i < regions.size(); ++i) {
      owned.push_back(p.dup_memfd());
      fds.push_back(owned.back().get());
    }
  }
  return p.raw_request(Request::set_mem_table, payload, fds);
}

Answer one_region(RawPeer& p, wire::MemoryRegion r) { return mem_table(p, std::span(&r, 1), 1); }

Outcome table_case(RawPeer& p, std::initializer_list<wire::MemoryRegion> regs) {
  if (auto u = up(p); !u) return std::unexpected(u.error());
  std::vector<wire::MemoryRegion> v(regs);
  return must_refuse(mem_table(p, v, static_cast<std::uint32_t>(v.size())), "table");
}

constexpr std::uint64_t kG = RawPeer::kGpaBase;
constexpr std::uint64_t kM = RawPeer::kMemSize;
constexpr std::uint64_t kD = RawPeer::kDataOffset;

void framing(std::vector<Case>& c) {
  c.push_back(
      {"framing", "truncated header, hang up", true, true, [](RawPeer& p, Target) -> Outcome {
         const std::uint8_t half[6] = {1, 0, 0, 0, 1, 0};
         if (!p.send_bytes(half)) return fail(Errc::system, "send");
         return std::string("hung up");
       }});
  c.push_back({"framing", "truncated header, stall", true, true, [](RawPeer& p, Target) -> Outcome {
                 const std::uint8_t half[6] = {1, 0, 0, 0, 1, 0};
                 if (!p.send_bytes(half)) return fail(Errc::system, "send");
                 if (!p.closed_within(kStallClose))
                   return fail(Errc::broken, "a stalled header kept the session for 10 s");
                 return std::string("closed");
               }});
  c.push_back({"framing", "payload shorter than size, hang up", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::array<std::uint8_t, 10> part{};
                 if (!p.send_raw(hdr(Request::set_vring_addr, kVersion, 40), part))
                   return fail(Errc::system, "send");
                 return std::string("hung up");
               }});
  c.push_back({"framing", "payload shorter than size, stall", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::array<std::uint8_t, 10> part{};
                 if (!p.send_raw(hdr(Request::set_vring_addr, kVersion, 40), part))
                   return fail(Errc::system, "send");
                 if (!p.closed_within(kStallClose))
                   return fail(Errc::broken, "a stalled payload kept the session for 10 s");
                 return std::string("closed");
               }});
  c.push_back(
      {"framing", "size over any message (100000)", true, true, [](RawPeer& p, Target) -> Outcome {
         if (!p.send_raw(hdr(Request::set_features, kVersion, 100000), {}))
           return fail(Errc::system, "send");
         if (!p.closed_within(kStallClose)) return fail(Errc::broken, "connection kept");
         return std::string("closed");
       }});
  c.push_back({"framing", "size lies short (SET_VRING_ADDR in 8 bytes)", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 const std::uint64_t v = 0;
                 return must_refuse(p.raw_request(Request::set_vring_addr, bytes_of(v)), "short");
               }});
  c.push_back({"framing", "size lies long (SET_FEATURES with 64 bytes)", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::array<std::uint8_t, 64> big{};
                 return must_refuse(p.raw_request(Request::set_features, big), "long");
               }});
  c.push_back({"framing", "SET_MEM_TABLE nregions 9 in 264 bytes", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::array<wire::MemoryRegion, 8> r{};
                 for (std::size_t i = 0; i < r.size(); ++i)
                   r[i] = wreg(kG + i * 4096, 4096, p.uva(i * 4096), i * 4096);
                 return must_refuse(mem_table(p, r, 9), "nregions 9");
               }});
  c.push_back({"framing", "wrong version bits", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (!p.send_raw(hdr(Request::get_features, 2, 0), {}))
                   return fail(Errc::system, "send");
                 auto rep = p.channel().recv();
                 if (rep) return fail(Errc::invalid_argument, "answered a version-2 message");
                 return std::string("closed");
               }});
  c.push_back(
      {"framing", "REPLY flag from the front-end", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         const std::uint64_t v = 0;
         Header h = hdr(Request::set_features, kVersion | kReplyFlag | kNeedReplyFlag, 8);
         if (!p.send_raw(h, bytes_of(v))) return fail(Errc::system, "send");
         return must_refuse(p.read_ack(Request::set_features), "reply flag");
       }});
  c.push_back({"framing", "unknown requests 0, 44, 99, 0xffffffff", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 const std::uint64_t v = 0;
                 auto ask = [&](std::uint32_t r) {
                   return p.raw_request(static_cast<Request>(r), bytes_of(v));
                 };
                 return all_refused(
                     {{ask(0), "0"}, {ask(44), "44"}, {ask(99), "99"}, {ask(0xffffffffu), "~0"}});
               }});
  c.push_back(
      {"framing", "flood of 2000 unknown requests", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         for (int i = 0; i < 2000; ++i) {
           if (!p.send_raw(hdr(static_cast<Request>(99), kVersion, 0), {}))
             return std::string("closed");
         }
         auto f = p.get_u64(Request::get_features);
         if (!f) return std::string("closed");
         return std::string("served after");
       }});
  c.push_back({"framing", "requests with a back-end's own reply, as requests", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 // Unsupported but defined requests; each must get some answer and not hang the
                 // session.
                 wire::IotlbMsg m{};
                 auto a = p.raw_request(Request::iotlb_msg, bytes_of(m));
                 wire::Inflight in{};
                 auto b = p.raw_request(Request::get_inflight_fd, bytes_of(in));
                 auto f = p.get_u64(Request::get_features);
                 if (!f) return fail(Errc::broken, "session gone after IOTLB/GET_INFLIGHT_FD");
                 return fmt::format("{}/{}", to_string(a), to_string(b));
               }});
}

void indices(std::vector<Case>& c) {
  const std::pair<Request, const char*> state_msgs[] = {
      {Request::set_vring_num, "SET_VRING_NUM"},
      {Request::set_vring_base, "SET_VRING_BASE"},
      {Request::set_vring_enable, "SET_VRING_ENABLE"},
      {Request::set_vring_endian, "SET_VRING_ENDIAN"},
      {Request::vring_kick, "VRING_KICK"}};
  for (const auto& [r, name] : state_msgs) {
    const Request req = r;
    c.push_back({"index", fmt::format("{} index out of range", name), true, true,
                 [req](RawPeer& p, Target t) {
                   return vring_state_indices(p, t, req, req == Request::set_vring_num ? 64 : 0);
                 }});
  }
  c.push_back({"index", "GET_VRING_BASE index out of range", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 return all_refused({{get_vring_base_answer(p, queues_of(t)), "n"},
                                     {get_vring_base_answer(p, 255), "255"},
                                     {get_vring_base_answer(p, 0xffffffffu), "~0"}});
               }});
  c.push_back({"index", "SET_VRING_ADDR index out of range", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 if (auto m = p.set_mem_table(); !m) return std::unexpected(m.error());
                 std::string out;
                 for (std::uint32_t idx : {queues_of(t), 255u, 0xffffffffu}) {
                   wire::VringAddr a{idx, 0, p.uva(0), p.uva(8192), p.uva(4096), 0};
                   auto o = must_refuse(p.raw_request(Request::set_vring_addr, bytes_of(a)),
                                        fmt::format("index {}", idx));
                   if (!o) return o;
                   out = *o;
                 }
                 return out;
               }});
  const std::pair<Request, const char*> fd_msgs[] = {{Request::set_vring_kick, "SET_VRING_KICK"},
                                                     {Request::set_vring_call, "SET_VRING_CALL"},
                                                     {Request::set_vring_err, "SET_VRING_ERR"}};
  for (const auto& [r, name] : fd_msgs) {
    const Request req = r;
    c.push_back({"index", fmt::format("{} index out of range", name), true, true,
                 [req](RawPeer& p, Target t) { return vring_fd_indices(p, t, req); }});
  }
}

void ring_setup(std::vector<Case>& c) {
  c.push_back({"ring size", "SET_VRING_NUM 0, 3, 100, 65535, 65536, 2^31", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 auto num = [&](std::uint32_t n) { return p.ask(SetVringNum{0, n}); };
                 return all_refused({{num(0), "0"},
                                     {num(3), "3"},
                                     {num(100), "100"},
                                     {num(65535), "65535"},
                                     {num(65536), "65536"},
                                     {num(0x80000000u), "2^31"}});
               }});
  c.push_back(
      {"ring size", "SET_VRING_BASE 65536 and ~0", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         return all_refused({{p.ask(SetVringBase{0, 65536}), "65536"},
                             {p.ask(SetVringBase{0, 0xffffffffu}), "~0"}});
       }});
  c.push_back({"ring size", "SET_VRING_ADDR outside, misaligned, wrapping, straddling", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 if (auto m = p.set_mem_table(); !m) return std::unexpected(m.error());
                 if (auto n = p.ok(SetVringNum{0, 256}); !n) return std::unexpected(n.error());
                 auto addr = [&](std::uint64_t d, std::uint64_t a, std::uint64_t u) {
                   SetVringAddr m;
                   m.index = 0;
                   m.addr.desc_user_addr = d;
                   m.addr.avail_user_addr = a;
                   m.addr.used_user_addr = u;
                   return p.ask(m);
                 };
                 const std::uint64_t b = p.uva();
                 return all_refused(
                     {{addr(0x1000, b + 8192, b + 12288), "desc unmapped"},
                      {addr(b + 1, b + 8192, b + 12288), "desc misaligned"},
                      {addr(b, b + 8193, b + 12288), "avail misaligned"},
                      {addr(b, b + 8192, b + 12290), "used misaligned"},
                      {addr(~std::uint64_t{0} - 4095, b + 8192, b + 12288), "desc wraps"},
                      {addr(b + kM - 16, b + 8192, b + 12288), "desc straddles the end"},
                      {addr(b, b + 8192, b + kM - 64), "used straddles the end"}});
               }});
}

void fds(std::vector<Case>& c) {
  c.push_back({"fds", "fd on SET_FEATURES", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 UniqueFd fd = make_eventfd();
                 const int f[1] = {fd.get()};
                 return must_refuse(p.raw_request(Request::set_features, bytes_of(p.features()), f),
                                    "stray fd");
               }});
  c.push_back({"fds", "fd on GET_FEATURES", true, true, [](RawPeer& p, Target) -> Outcome {
                 UniqueFd fd = make_eventfd();
                 const int f[1] = {fd.get()};
                 if (!p.send_raw(hdr(Request::get_features, kVersion, 0), {}, f))
                   return fail(Errc::system, "send");
                 auto rep = p.channel().recv();
                 if (!rep) return std::string("closed");
                 return std::string("answered, fd dropped");
               }});
  c.push_back({"fds", "9 fds on SET_VRING_CALL", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::vector<UniqueFd> own;
                 std::vector<int> f;
                 for (int i = 0; i < 9; ++i) {
                   own.push_back(make_eventfd());
                   f.push_back(own.back().get());
                 }
                 const std::uint64_t v = 0;
                 return too_many_fds(p, p.raw_request(Request::set_vring_call, bytes_of(v), f));
               }});
  c.push_back({"fds", "250 fds on SET_MEM_TABLE", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 std::vector<UniqueFd> own;
                 std::vector<int> f;
                 for (int i = 0; i < 250; ++i) {
                   own.push_back(p.dup_memfd());
                   f.push_back(own.back().get());
                 }
                 wire::MemoryRegion r = wreg(kG, kM, p.uva(), 0);
                 return too_many_fds(p, mem_table(p, std::span(&r, 1), 1, f, true));
               }});
  c.push_back(
      {"fds", "KICK with neither fd nor no-fd bit", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         const std::uint64_t v = 0;
         return must_refuse(p.raw_request(Request::set_vring_kick, bytes_of(v)), "no fd");
       }});
  c.push_back({"fds", "CALL with two fds", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 UniqueFd a = make_eventfd(), b = make_eventfd();
                 const int f[2] = {a.get(), b.get()};
                 const std::uint64_t v = 0;
                 return must_refuse(p.raw_request(Request::set_vring_call, bytes_of(v), f),
                                    "two fds");
               }});
  c.push_back({"fds", "KICK no-fd bit with an fd", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 UniqueFd a = make_eventfd();
                 const int f[1] = {a.get()};
                 const std::uint64_t v = kVringNoFdMask;
                 return must_refuse(p.raw_request(Request::set_vring_kick, bytes_of(v), f),
                                    "nofd + fd");
               }});
  c.push_back(
      {"fds", "KICK fd is a socket that hangs up", true, true, [](RawPeer& p, Target t) -> Outcome {
         if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
         int sv[2];
         if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
           return fail_errno("socketpair");
         UniqueFd a(sv[0]), b(sv[1]);
         const int f[1] = {a.get()};
         const std::uint64_t v = attacked_ring(t);
         auto ans = p.raw_request(Request::set_vring_kick, bytes_of(v), f);
         b.reset();  // the kick fd now reads EOF forever: it must not spin the worker
         if (ans != Answer::ack) return any(ans);
         // Taken: the worker must find the fd unreadable for good and break the ring, which it says
         // on the ring's err eventfd (nothing is posted, so no used entry can come instead).
         const std::uint32_t r = attacked_ring(t);
         const auto ev = p.wait_ring(r, static_cast<std::uint16_t>(p.used_idx(r) + 1), 20s);
         if (ev != RawPeer::RingEvent::error)
           return fail(Errc::broken, "kick fd hung up but the ring's err eventfd never fired");
         return std::string("accepted, then the ring broken (err signalled)");
       }});
}

void tables(std::vector<Case>& c) {
  c.push_back(
      {"table", "regions overlap in guest-physical space", true, true, [](RawPeer& p, Target) {
         return table_case(
             p, {wreg(kG, kM / 2, p.uva(), 0), wreg(kG + kM / 4, kM / 2, p.uva(kM / 2), kM / 2)});
       }});
  c.push_back({"table", "regions overlap in user space", true, true, [](RawPeer& p, Target) {
                 return table_case(p, {wreg(kG, kM / 2, p.uva(), 0),
                                       wreg(kG + kM, kM / 2, p.uva(kM / 4), kM / 2)});
               }});
  c.push_back({"table", "guest-physical range wraps", true, true, [](RawPeer& p, Target) {
                 return table_case(p, {wreg(~std::uint64_t{0} - 4095, 8192, p.uva(), 0)});
               }});
  c.push_back({"table", "user range wraps", true, true, [](RawPeer& p, Target) {
                 return table_case(p, {wreg(kG, 8192, ~std::uint64_t{0} - 4095, 0)});
               }});
  c.push_back({"table", "mmap_offset past the file", true, true,
               [](RawPeer& p, Target) { return table_case(p, {wreg(kG, 4096, p.uva(), kM)}); }});
  c.push_back({"table", "offset + size past the file", true, true,
               [](RawPeer& p, Target) { return table_case(p, {wreg(kG, kM, p.uva(), 4096)}); }});
  c.push_back({"table", "size larger than the file", true, true,
               [](RawPeer& p, Target) { return table_case(p, {wreg(kG, 2 * kM, p.uva(), 0)}); }});
  c.push_back({"table", "mmap_offset wraps", true, true, [](RawPeer& p, Target) {
                 return table_case(p, {wreg(kG, 8192, p.uva(), ~std::uint64_t{0} - 4095)});
               }});
  c.push_back({"table", "zero-size region", true, true,
               [](RawPeer& p, Target) { return table_case(p, {wreg(kG, 0, p.uva(), 0)}); }});
  c.push_back({"table", "fewer fds than regions", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 wire::MemoryRegion r[2] = {wreg(kG, kM / 2, p.uva(), 0),
                                            wreg(kG + kM, kM / 2, p.uva(kM / 2), kM / 2)};
                 UniqueFd one = p.dup_memfd();
                 const int f[1] = {one.get()};
                 return must_refuse(mem_table(p, r, 2, f, true), "1 fd for 2 regions");
               }});
  c.push_back({"table", "more fds than regions", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 wire::MemoryRegion r = wreg(kG, kM, p.uva(), 0);
                 UniqueFd a = p.dup_memfd(), b = p.dup_memfd(), d = p.dup_memfd();
                 const int f[3] = {a.get(), b.get(), d.get()};
                 return must_refuse(mem_table(p, std::span(&r, 1), 1, f, true),
                                    "3 fds for 1 region");
               }});
  c.push_back(
      {"table", "region fd not mappable (eventfd)", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         wire::MemoryRegion r = wreg(kG, 4096, p.uva(), 0);
         UniqueFd e = make_eventfd();
         const int f[1] = {e.get()};
         return must_refuse(mem_table(p, std::span(&r, 1), 1, f, true), "eventfd region");
       }});
  c.push_back({"table", "ADD_MEM_REG past the 509-slot limit", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 auto slots = p.get_u64(Request::get_max_mem_slots);
                 if (!slots) return std::unexpected(slots.error());
                 const std::uint64_t page = 4096;
                 if (*slots + 1 > kM / page)
                   return fail(Errc::out_of_range,
                               fmt::format("{} slots: memfd too small", *slots));
                 for (std::uint64_t i = 0; i <= *slots; ++i) {
                   AddMemReg m;
                   m.region.spec = {.guest_phys_addr = kG + i * page,
                                    .size = page,
                                    .userspace_addr = p.uva(i * page),
                                    .mmap_offset = i * page};
                   m.region.fd = p.dup_memfd();
                   const Answer a = p.ask(m);
                   if (i < *slots && a != Answer::ack) {
                     return fail(Errc::invalid_argument,
                                 fmt::format("region {} of {}: {}", i, *slots, to_string(a)));
                   }
                   if (i == *slots)
                     return must_refuse(a, fmt::format("region {} (limit {})", i + 1, *slots));
                 }
                 return std::string("?");
               }});
  c.push_back({"table", "ADD_MEM_REG overlapping, REM_MEM_REG unknown", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 if (auto m = p.set_mem_table(); !m) return std::unexpected(m.error());
                 AddMemReg m;
                 m.region.spec = {.guest_phys_addr = kG + 4096,
                                  .size = 4096,
                                  .userspace_addr = p.uva(kM + 4096),
                                  .mmap_offset = 0};
                 m.region.fd = p.dup_memfd();
                 RemMemReg r;
                 r.spec = {.guest_phys_addr = kG + 3 * kM,
                           .size = 4096,
                           .userspace_addr = 0x1000,
                           .mmap_offset = 0};
                 return all_refused({{p.ask(m), "overlap"}, {p.ask(r), "unknown region"}});
               }});
  c.push_back(
      {"table", "SET_LOG_BASE past the file", true, true, [](RawPeer& p, Target) -> Outcome {
         if (auto u = up(p); !u) return std::unexpected(u.error());
         wire::Log l{kM * 4, 0};
         UniqueFd fd = p.dup_memfd();
         const int f[1] = {fd.get()};
         return must_refuse(p.raw_request(Request::set_log_base, bytes_of(l), f),
                            "log past the file");
       }});
}

void order(std::vector<Case>& c) {
  c.push_back({"order", "ring started with addresses but no memory table", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 // With no table the device can only check alignment; translation waits for the
                 // start.
                 SetVringAddr a;
                 a.addr.desc_user_addr = p.uva();
                 a.addr.avail_user_addr = p.uva(8192);
                 a.addr.used_user_addr = p.uva(12288);
                 const Answer addr = p.ask(a);
                 const Answer num = p.ask(SetVringNum{0, 64});
                 UniqueFd k = make_eventfd();
                 SetVringKick kick;
                 kick.fd = UniqueFd(::fcntl(k.get(), F_DUPFD_CLOEXEC, 0));
                 const Answer ka = p.ask(kick);
                 const Answer en = p.ask(SetVringEnable{0, 1});
                 const std::uint64_t one = 1;
                 [[maybe_unused]] auto w = ::write(k.get(), &one, sizeof one);
                 // The marker: had the ring started, GET_VRING_BASE stops it on its worker, after
                 // the kick (ready first) was handled there.
                 auto base = p.get_vring_base(0);
                 return fmt::format("addr {}, num {}, kick {}, enable {}; {}", to_string(addr),
                                    to_string(num), to_string(ka), to_string(en),
                                    base ? fmt::format("base {}", base->num) : "no base");
               }});
  c.push_back({"order", "SET_OWNER twice", true, true, [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 return must_refuse(p.ask(SetOwner{}), "second owner");
               }});
  c.push_back({"order", "SET_FEATURES with bits not offered", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 return must_refuse(p.ask(SetFeatures{~std::uint64_t{0}}), "all bits");
               }});
  c.push_back({"order", "ring messages before SET_OWNER and features", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 // No handshake at all: no REPLY_ACK either, so a GET_FEATURES after proves the
                 // session lives.
                 UniqueFd k = make_eventfd();
                 SetVringKick kick;
                 kick.fd = UniqueFd(::fcntl(k.get(), F_DUPFD_CLOEXEC, 0));
                 (void)p.channel().send_message(SetVringNum{0, 64});
                 (void)p.channel().send_message(SetVringBase{0, 0});
                 (void)p.channel().send_message(kick);
                 (void)p.channel().send_message(SetVringEnable{0, 1});
                 if (p.closed_within(50ms)) return std::string("closed");
                 auto f = p.get_u64(Request::get_features);
                 return std::string(f ? "ignored/refused, still serving" : "closed");
               }});
  c.push_back({"order", "kick and enable a ring with no addresses", true, true,
               [](RawPeer& p, Target) -> Outcome {
                 if (auto u = up(p); !u) return std::unexpected(u.error());
                 if (auto m = p.set_mem_table(); !m) return std::unexpected(m.error());
                 UniqueFd k = make_eventfd();
                 SetVringKick kick;
                 kick.fd = UniqueFd(::fcntl(k.get(), F_DUPFD_CLOEXEC, 0));
                 const Answer a = p.ask(kick);
                 const Answer e = p.ask(SetVringEnable{0, 1});
                 const std::uint64_t one = 1;
                 [[maybe_unused]] auto w = ::write(k.get(), &one, sizeof one);
                 // The marker: had the ring started, GET_VRING_BASE stops it on its worker, after
                 // the kick.
                 auto base = p.get_vring_base(0);
                 return fmt::format("kick {}, enable {}; {}", to_string(a), to_string(e),
                                    base ? fmt::format("base {}", base->num) : "no base");
               }});
  c.push_back({"order", "new memory table not covering running rings", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 // The rings live in the first 64 KiB x rings; the new table starts past them.
                 wire::MemoryRegion r = wreg(kG + kD, kM - kD, p.uva(kD), kD);
                 const Answer a = one_region(p, r);
                 p.kick(attacked_ring(t));
                 // The marker: GET_VRING_BASE stops the ring on its worker, after that kick was
                 // handled.
                 (void)p.get_vring_base(attacked_ring(t));
                 return any(a);
               }});
  c.push_back({"order", "REM_MEM_REG of the region under running rings", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 RemMemReg r;
                 r.spec = p.region();
                 const Answer a = p.ask(r);
                 p.kick(attacked_ring(t));
                 // The marker: GET_VRING_BASE stops the ring on its worker, after that kick was
                 // handled.
                 (void)p.get_vring_base(attacked_ring(t));
                 return any(a);
               }});
  c.push_back({"order", "SET_FEATURES and SET_VRING_NUM while rings run", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 const Answer a = p.ask(
                     SetFeatures{p.features() & ~virtio::bit(virtio::feature::ring_indirect_desc)});
                 const Answer b = p.ask(SetVringNum{attacked_ring(t), 128});
                 p.kick(attacked_ring(t));
                 return fmt::format("features {}, num {}", to_string(a), to_string(b));
               }});
  c.push_back({"order", "RESET_OWNER mid-session, then ring messages", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 (void)p.channel().send_message(ResetOwner{});
                 const Answer a = p.ask(SetVringNum{0, 64});
                 p.kick(attacked_ring(t));
                 return fmt::format("ring message after reset: {}", to_string(a));
               }});
  c.push_back({"order", "GET_VRING_BASE, then kicks on the stopped ring", true, true,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 auto b = p.get_vring_base(attacked_ring(t));
                 if (!b) return std::unexpected(b.error());
                 for (int i = 0; i < 100; ++i) p.kick(attacked_ring(t));
                 auto b2 = p.get_vring_base(attacked_ring(t));
                 return std::string(b2 ? "stopped, second GET answered" : "stopped");
               }});
}

}  // namespace

std::vector<Case> message_cases() {
  std::vector<Case> c;
  framing(c);
  indices(c);
  ring_setup(c);
  fds(c);
  tables(c);
  order(c);
  return c;
}

}  // namespace vhostkit::hostile
