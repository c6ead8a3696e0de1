// Bad rings: descriptors and indices written straight into the shared memory of a device that
// was brought up properly, then kicked.
#include <unistd.h>

#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "cases.h"
#include "vhostkit/virtio/blk.h"

namespace vhostkit::hostile {

using namespace std::chrono_literals;
using virtio::kDescFIndirect;
using virtio::kDescFNext;
using virtio::kDescFWrite;
using virtio::VirtqDesc;

namespace {

using Outcome = Result<std::string>;

constexpr std::uint64_t kG = RawPeer::kGpaBase;
constexpr std::uint64_t kM = RawPeer::kMemSize;
constexpr std::size_t kData = RawPeer::kDataOffset;           // buffers
constexpr std::size_t kTable = RawPeer::kDataOffset + 65536;  // an indirect table
constexpr std::size_t kNetHdr = 12;                           // VERSION_1 virtio-net header

enum class Expect : std::uint8_t {
  bad_chain,  // answered with used len 0, the ring goes on
  broken,     // the ring stops and its err eventfd is signalled
  answered,   // answered (a device-level error status is fine), the ring goes on
};

// Fills the start of a valid request for the target in the data area: for net a header and a
// 60-byte frame (readable); for blk a 16-byte IN header for sector 0 (readable). Returns its
// length.
std::uint32_t request_head(RawPeer& p, Target t, std::uint64_t sector = 0,
                           std::uint32_t type = virtio::blk_type::in) {
  std::uint8_t* d = p.mem() + kData;
  if (t == Target::net) {
    std::memset(d, 0, kNetHdr + 60);
    const std::uint8_t macs[12] = {0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1};
    std::memcpy(d + kNetHdr, macs, sizeof macs);
    d[kNetHdr + 12] = 0x88;  // a local experimental ethertype
    d[kNetHdr + 13] = 0xb5;
    return kNetHdr + 60;
  }
  virtio::VirtioBlkOutHdr h{type, 0, sector};
  std::memcpy(d, &h, sizeof h);
  return sizeof h;
}

struct Post {
  std::uint16_t head = 0;
  std::uint16_t idx_step = 1;
};

Outcome ring_case(RawPeer& p, Target t, Expect e,
                  const std::function<Post(VirtqDesc* desc)>& fill) {
  if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
  const std::uint32_t ring = attacked_ring(t);
  const Post post = fill(p.desc(ring));
  const std::uint16_t before = p.used_idx(ring);
  p.post_head(ring, post.head, post.idx_step);
  p.kick(ring);
  // Generous: the answer normally comes in microseconds, but a loaded host may not run the
  // back-end's worker for a while; what this catches is a chain never answered.
  const auto ev = p.wait_ring(ring, static_cast<std::uint16_t>(before + 1), 20s);
  switch (ev) {
    case RawPeer::RingEvent::nothing:
      return fail(Errc::broken, "no used entry and no error signal within 20 s");
    case RawPeer::RingEvent::error:
      if (e != Expect::broken)
        return fail(Errc::invalid_argument, "ring marked broken for a bad chain");
      return std::string("ring broken (err fd)");
    case RawPeer::RingEvent::used: break;
  }
  if (e == Expect::broken)
    return fail(Errc::invalid_argument, "served a ring that should have broken");
  const auto u = p.used_elem(ring, before);
  if (u.id != post.head)
    return fail(Errc::invalid_argument, fmt::format("used id {} for head {}", u.id, post.head));
  if (e == Expect::bad_chain && u.len != 0) {
    return fail(Errc::invalid_argument, fmt::format("bad chain answered with used len {}", u.len));
  }
  if (e == Expect::answered && t == Target::blk && u.len != 0 &&
      p.mem()[kData + 8192] == virtio::kBlkSOk) {
    return fail(Errc::invalid_argument, "a bad request reported success");
  }
  if (e == Expect::answered && t == Target::blk) {
    return fmt::format("used len {}, status {}", u.len, p.mem()[kData + 8192]);
  }
  return fmt::format("used len {}", u.len);
}

// A chain of `d` descriptors starting at 0, each with `next` i+1 (the last without NEXT).
void chain(VirtqDesc* desc, std::initializer_list<VirtqDesc> d) {
  std::uint16_t i = 0;
  for (const VirtqDesc& x : d) desc[i++] = x;
}

void chain_cases(std::vector<Case>& c) {
  auto add = [&c](std::string name, Expect e, std::function<Post(RawPeer&, Target, VirtqDesc*)> f) {
    c.push_back({"bad ring", std::move(name), true, true, [e, f](RawPeer& p, Target t) {
                   return ring_case(p, t, e, [&](VirtqDesc* d) { return f(p, t, d); });
                 }});
  };
  add("descriptor loop 0 -> 1 -> 0", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    const std::uint32_t n = request_head(p, t);
    chain(d, {{p.gpa(kData), n, kDescFNext, 1},
              {p.gpa(kData + 4096), 512, kDescFNext | kDescFWrite, 0}});
    return Post{};
  });
  add("descriptor points at itself", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), kDescFNext, 0}});
    return Post{};
  });
  add("next out of range (64, 0xffff)", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), kDescFNext, 1},
              {p.gpa(kData + 4096), 512, kDescFNext | kDescFWrite, 0xffff}});
    return Post{};
  });
  add("head out of range (64)", Expect::broken, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), 0, 0}});
    return Post{64};
  });
  add("head 0xffff", Expect::broken, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), 0, 0}});
    return Post{0xffff};
  });
  add("avail idx runaway (+1000)", Expect::broken, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), 0, 0}});
    return Post{0, 1000};
  });
  add("avail idx one past the ring (+65)", Expect::broken, [](RawPeer& p, Target t, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, t), 0, 0}});
    return Post{0, 65};
  });
  add("buffer outside guest memory", Expect::bad_chain, [](RawPeer&, Target, VirtqDesc* d) {
    chain(d, {{0x10, 64, 0, 0}});
    return Post{};
  });
  add("buffer running past the end of memory", Expect::bad_chain,
      [](RawPeer&, Target, VirtqDesc* d) {
        chain(d, {{kG + kM - 8, 64, 0, 0}});
        return Post{};
      });
  add("buffer address wraps", Expect::bad_chain, [](RawPeer&, Target, VirtqDesc* d) {
    chain(d, {{~std::uint64_t{0} - 4095, 8192, 0, 0}});
    return Post{};
  });
  add("zero-length buffer", Expect::bad_chain, [](RawPeer& p, Target, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), 0, 0, 0}});
    return Post{};
  });
  add("buffer length 0xffffffff", Expect::bad_chain, [](RawPeer& p, Target, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), 0xffffffffu, 0, 0}});
    return Post{};
  });
  add("readable after writable", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    const std::uint32_t n = request_head(p, t);
    chain(d, {{p.gpa(kData + 4096), 512, kDescFNext | kDescFWrite, 1}, {p.gpa(kData), n, 0, 0}});
    return Post{};
  });
  add("indirect table of length 0", Expect::bad_chain, [](RawPeer& p, Target, VirtqDesc* d) {
    chain(d, {{p.gpa(kTable), 0, kDescFIndirect, 0}});
    return Post{};
  });
  add("indirect table of 17 bytes", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    auto* tab = reinterpret_cast<VirtqDesc*>(p.mem() + kTable);
    tab[0] = {p.gpa(kData), request_head(p, t), 0, 0};
    chain(d, {{p.gpa(kTable), 17, kDescFIndirect, 0}});
    return Post{};
  });
  add("indirect table outside memory", Expect::bad_chain, [](RawPeer&, Target, VirtqDesc* d) {
    chain(d, {{kG + kM + 4096, 64, kDescFIndirect, 0}});
    return Post{};
  });
  add("nested indirect table", Expect::bad_chain, [](RawPeer& p, Target, VirtqDesc* d) {
    auto* tab = reinterpret_cast<VirtqDesc*>(p.mem() + kTable);
    tab[0] = {p.gpa(kTable), 32, kDescFIndirect, 0};
    chain(d, {{p.gpa(kTable), 32, kDescFIndirect, 0}});
    return Post{};
  });
  add("INDIRECT and NEXT on one descriptor", Expect::bad_chain,
      [](RawPeer& p, Target t, VirtqDesc* d) {
        auto* tab = reinterpret_cast<VirtqDesc*>(p.mem() + kTable);
        tab[0] = {p.gpa(kData), request_head(p, t), 0, 0};
        chain(d, {{p.gpa(kTable), 16, kDescFIndirect | kDescFNext, 1},
                  {p.gpa(kData + 4096), 1, kDescFWrite, 0}});
        return Post{};
      });
  add("loop inside an indirect table", Expect::bad_chain, [](RawPeer& p, Target t, VirtqDesc* d) {
    auto* tab = reinterpret_cast<VirtqDesc*>(p.mem() + kTable);
    tab[0] = {p.gpa(kData), request_head(p, t), kDescFNext, 1};
    tab[1] = {p.gpa(kData + 4096), 512, kDescFNext | kDescFWrite, 0};
    chain(d, {{p.gpa(kTable), 32, kDescFIndirect, 0}});
    return Post{};
  });
  add("next out of range inside an indirect table", Expect::bad_chain,
      [](RawPeer& p, Target t, VirtqDesc* d) {
        auto* tab = reinterpret_cast<VirtqDesc*>(p.mem() + kTable);
        tab[0] = {p.gpa(kData), request_head(p, t), kDescFNext, 2};  // the table has 2 entries
        tab[1] = {p.gpa(kData + 4096), 512, kDescFWrite, 0};
        chain(d, {{p.gpa(kTable), 32, kDescFIndirect, 0}});
        return Post{};
      });
  add("indirect table 1 MiB long (65536 entries)", Expect::bad_chain,
      [](RawPeer& p, Target, VirtqDesc* d) {
        chain(d, {{p.gpa(kData), 1u << 20, kDescFIndirect, 0}});
        return Post{};
      });
}

void net_cases(std::vector<Case>& c) {
  auto add = [&c](std::string name, Expect e, std::function<Post(RawPeer&, VirtqDesc*)> f) {
    c.push_back({"bad frame", std::move(name), true, false, [e, f](RawPeer& p, Target t) {
                   return ring_case(p, t, e, [&](VirtqDesc* d) { return f(p, d); });
                 }});
  };
  add("tx: device-writable buffer on the transmitq", Expect::bad_chain,
      [](RawPeer& p, VirtqDesc* d) {
        chain(d, {{p.gpa(kData), request_head(p, Target::net), kDescFWrite, 0}});
        return Post{};
      });
  add("tx: frame shorter than header + Ethernet", Expect::bad_chain, [](RawPeer& p, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), 8, 0, 0}});
    return Post{};
  });
  add("tx: frame over 64 KiB", Expect::bad_chain, [](RawPeer& p, VirtqDesc* d) {
    request_head(p, Target::net);
    chain(d, {{p.gpa(kData), 40000, kDescFNext, 1}, {p.gpa(kData + 40000), 40000, 0, 0}});
    return Post{};
  });
  c.push_back({"bad frame", "rx: buffers shorter than the header", true, false,
               [](RawPeer& p, Target t) -> Outcome {
                 if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
                 // Eight 4-byte rx buffers (descriptors 0..7 of the receiveq), then one good frame
                 // on tx.
                 for (std::uint16_t i = 0; i < 8; ++i) {
                   p.desc(0)[i] = {p.gpa(kData + 8192 + i * 64u), 4, kDescFWrite, 0};
                   p.post_head(0, i);
                 }
                 p.kick(0);
                 p.desc(1)[0] = {p.gpa(kData), request_head(p, t), 0, 0};
                 p.post_head(1, 0);
                 p.kick(1);
                 if (p.wait_ring(1, 1, 20s) != RawPeer::RingEvent::used)
                   return fail(Errc::broken, "tx not answered");
                 // The loopback refuses the eight short buffers while delivering that frame; wait
                 // for their used entries (bounded: fewer shows in the outcome).
                 (void)p.wait_ring(0, 8, 20s);
                 const std::uint16_t n = p.used_idx(0);
                 for (std::uint16_t i = 0; i < n; ++i) {
                   if (p.used_elem(0, i).len > 4) {
                     return fail(
                         Errc::invalid_argument,
                         fmt::format("rx used len {} in a 4-byte buffer", p.used_elem(0, i).len));
                   }
                 }
                 return fmt::format("tx done, {} rx refused with len 0", n);
               }});
}

void blk_cases(std::vector<Case>& c) {
  auto add = [&c](std::string name, Expect e, std::function<Post(RawPeer&, VirtqDesc*)> f) {
    c.push_back({"bad request", std::move(name), false, true, [e, f](RawPeer& p, Target t) {
                   return ring_case(p, t, e, [&](VirtqDesc* d) { return f(p, d); });
                 }});
  };
  // The status byte lives at kData + 8192; the device must not report success.
  auto io = [](RawPeer& p, VirtqDesc* d, std::uint64_t sector, std::uint32_t len) {
    const std::uint32_t n = request_head(p, Target::blk, sector);
    p.mem()[kData + 8192] = 0xee;
    chain(d, {{p.gpa(kData), n, kDescFNext, 1},
              {p.gpa(kData + 4096), len, kDescFNext | kDescFWrite, 2},
              {p.gpa(kData + 8192), 1, kDescFWrite, 0}});
    return Post{};
  };
  add("read past the capacity", Expect::answered,
      [io](RawPeer& p, VirtqDesc* d) { return io(p, d, 1u << 30, 512); });
  add("sector number overflows (~0)", Expect::answered,
      [io](RawPeer& p, VirtqDesc* d) { return io(p, d, ~std::uint64_t{0}, 512); });
  add("data length not a sector multiple", Expect::answered,
      [io](RawPeer& p, VirtqDesc* d) { return io(p, d, 0, 100); });
  add("header shorter than 16 bytes", Expect::answered, [](RawPeer& p, VirtqDesc* d) {
    request_head(p, Target::blk);
    p.mem()[kData + 8192] = virtio::kBlkSOk;  // must be overwritten with an error (or len 0)
    chain(d, {{p.gpa(kData), 8, kDescFNext, 1}, {p.gpa(kData + 8192), 1, kDescFWrite, 0}});
    return Post{};
  });
  add("no writable status byte", Expect::bad_chain, [](RawPeer& p, VirtqDesc* d) {
    chain(d, {{p.gpa(kData), request_head(p, Target::blk), 0, 0}});
    return Post{};
  });
}

void lifecycle_cases(std::vector<Case>& c) {
  c.push_back(
      {"lifecycle", "hang up with 60 requests in flight", true, true,
       [](RawPeer& p, Target t) -> Outcome {
         if (auto u = p.bring_up(rings_of(t)); !u) return std::unexpected(u.error());
         const std::uint32_t ring = attacked_ring(t);
         const std::uint32_t n = request_head(p, t);
         for (std::uint16_t i = 0; i < 60; ++i) {
           if (t == Target::net) {
             p.desc(ring)[i] = {p.gpa(kData), n, 0, 0};
             p.post_head(ring, i);
             continue;
           }
           // blk: 20 three-descriptor reads of 4 KiB each.
           if (i % 3 != 0) continue;
           p.desc(ring)[i] = {p.gpa(kData), n, kDescFNext, static_cast<std::uint16_t>(i + 1)};
           p.desc(ring)[i + 1] = {p.gpa(kData + 16384 + i * 4096u), 4096, kDescFNext | kDescFWrite,
                                  static_cast<std::uint16_t>(i + 2)};
           p.desc(ring)[i + 2] = {p.gpa(kData + 8192 + i), 1, kDescFWrite, 0};
           p.post_head(ring, i);
         }
         p.kick(ring);
         return std::string("hung up");  // the harness closes the connection right away
       }});
}

}  // namespace

std::vector<Case> ring_cases() {
  std::vector<Case> c;
  chain_cases(c);
  net_cases(c);
  blk_cases(c);
  lifecycle_cases(c);
  return c;
}

}  // namespace vhostkit::hostile
