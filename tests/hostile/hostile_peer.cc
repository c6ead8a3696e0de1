// hostile_peer: the process-level hostile run. Starts the real vhostkit-net --loopback and
// vhostkit-blk (on a temporary image) as child processes and throws every class of bad input
// from issue #6 at them over their sockets, one fresh connection per case. After each case:
// the child is still running, a well-behaved front-end connects and moves traffic (frames back
// through the loopback; a 4 KiB read that matches the image), and the child's fd count, RSS,
// mapping count and thread count are compared with the measurement before the case: fds and
// threads unchanged, no mapping more, RSS within a bound (docs/security.md states these). Then a
// connect/negotiate/traffic/disconnect loop (1,000 cycles by default) against each child, held
// to the same bounds.
//
// Measurements are taken while a probe connection is open and has been answered: the server
// serves one front-end at a time, so an answered probe means the previous session has ended
// and its device was reset, and every sample is taken in the same state.
//
// Exit status 0 when every case and check held, 1 otherwise (the table says which).
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "cases.h"
#include "raw_peer.h"
#include "testing/fd_count.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/virtio/blk.h"

namespace vhostkit::hostile {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// The children come from the same build as this program. In an AddressSanitizer build their
// allocator maps anonymous regions of its own as the heap grows (up to +4 mappings in a case,
// measured), so there the mapping count is of file-backed mappings only: guest memory (memfd),
// dirty logs, images, what a leaked region would keep.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kCountAnonMaps = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kCountAnonMaps = false;
#else
constexpr bool kCountAnonMaps = true;
#endif
#else
constexpr bool kCountAnonMaps = true;
#endif

// ---- the child -------------------------------------------------------------------------

struct Child {
  Target target{};
  pid_t pid = -1;
  std::string sock;
  std::string log;
  bool exited = false;
  int status = 0;

  bool alive() {
    if (exited) return false;
    if (::waitpid(pid, &status, WNOHANG) == pid) exited = true;
    return !exited;
  }
};

std::optional<Child> spawn(Target t, const std::string& bin, std::vector<std::string> args,
                           const std::string& sock, const std::string& log) {
  Child c;
  c.target = t;
  c.sock = sock;
  c.log = log;
  const pid_t pid = ::fork();
  if (pid < 0) return std::nullopt;
  if (pid == 0) {
    // In an AddressSanitizer build, freed memory sits in a quarantine (256 MiB by default) and
    // RSS grows with every free until it is full: a leak would hide in that growth. A 1 MiB
    // quarantine fills during the warm-up, so RSS deltas measure what is kept again. (No effect
    // on a normal build; LeakSanitizer still checks the child when it exits.)
    std::string asan = "quarantine_size_mb=1";
    if (const char* old = std::getenv("ASAN_OPTIONS"); old != nullptr && *old != '\0') {
      asan = std::string(old) + ":" + asan;
    }
    ::setenv("ASAN_OPTIONS", asan.c_str(), 1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(bin.c_str()));
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    std::_Exit(127);
  }
  c.pid = pid;
  return c;
}

std::string log_tail(const std::string& path, std::size_t lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (std::size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    out += "    | " + all[i] + "\n";
  }
  return out;
}

// ---- measuring it -----------------------------------------------------------------------

struct Sample {
  long fds = 0;
  long rss_kib = 0;
  long maps = 0;
  long threads = 0;
};

// The child's threads, less io_uring's workers (iou-wrk-*): the kernel starts those on demand
// for a ring's blocking requests and ends them when idle, so their number says nothing about
// threads the child keeps.
long count_threads(const std::string& base) {
  DIR* d = ::opendir((base + "task").c_str());
  if (d == nullptr) return -1;
  long n = 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(base + "task/" + e->d_name + "/comm");
    std::string comm;
    std::getline(f, comm);
    n += comm.rfind("iou-wrk-", 0) != 0;
  }
  ::closedir(d);
  return n;
}

Sample sample(pid_t pid) {
  Sample s;
  const std::string base = fmt::format("/proc/{}/", pid);
  s.fds = static_cast<long>(testing::open_fd_count(pid));
  std::ifstream st(base + "status");
  for (std::string l; std::getline(st, l);) {
    if (l.rfind("VmRSS:", 0) == 0) s.rss_kib = std::strtol(l.c_str() + 6, nullptr, 10);
  }
  s.threads = count_threads(base);
  s.maps = static_cast<long>(kCountAnonMaps ? testing::mapping_count({}, pid)
                                            : testing::file_mapping_count(pid));
  return s;
}

// Connects, gets GET_FEATURES answered (so the previous session is over), samples, hangs up.
Result<Sample> probe(Child& c) {
  const auto deadline = Clock::now() + 10s;
  for (;;) {
    auto ch = vhost_user::connect_unix(c.sock);
    if (ch) {
      (void)ch->set_timeout(5000ms);
      const vhost_user::Header h{static_cast<std::uint32_t>(Request::get_features),
                                 vhost_user::kVersion, 0};
      if (auto s = ch->send(h, {}); !s) return std::unexpected(s.error());
      auto rep = ch->recv();
      if (!rep) return std::unexpected(rep.error());
      return sample(c.pid);
    }
    if (Clock::now() > deadline || !c.alive()) return std::unexpected(ch.error());
    std::this_thread::sleep_for(20ms);
  }
}

// ---- well-behaved front-ends ------------------------------------------------------------

std::uint8_t image_byte(std::uint64_t off) {
  return static_cast<std::uint8_t>((off / 512) * 31 + off % 251);
}

// 32 frames out through the loopback and back, each checked.
Result<> good_net(const std::string& sock) {
  driver::NetDriverOptions o;
  o.socket_path = sock;
  o.queue_size = 256;
  o.memory_size = 0;
  o.timeout = 5000ms;
  auto s = driver::NetDriver::connect(std::move(o));
  if (!s) return std::unexpected(s.error());
  constexpr std::size_t kFrames = 32;
  std::vector<std::vector<std::uint8_t>> frames(kFrames);
  std::vector<std::span<const std::uint8_t>> spans;
  for (std::size_t i = 0; i < kFrames; ++i) {
    auto& f = frames[i];
    f.resize(60 + i * 40);
    const std::uint8_t macs[12] = {0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0, 0, 1};
    std::memcpy(f.data(), macs, 12);
    f[12] = 0x88;
    f[13] = 0xb5;
    for (std::size_t b = 14; b < f.size(); ++b) f[b] = static_cast<std::uint8_t>(i + b);
    spans.emplace_back(f);
  }
  std::size_t sent = 0, got = 0;
  bool mismatch = false;
  const auto deadline = Clock::now() + 20s;  // generous: a loaded host; normally milliseconds
  while (got < kFrames && Clock::now() < deadline) {
    if (sent < kFrames) sent += (*s)->tx_burst(0, std::span(spans).subspan(sent));
    (*s)->rx_burst(0, 64, [&](std::span<const std::uint8_t> f) {
      // Loopback swaps the MACs and keeps the rest.
      const auto& want = frames[std::min(got, kFrames - 1)];
      if (f.size() != want.size() || std::memcmp(f.data(), want.data() + 6, 6) != 0 ||
          std::memcmp(f.data() + 12, want.data() + 12, f.size() - 12) != 0) {
        mismatch = true;
      }
      ++got;
    });
    if (got < kFrames) (*s)->wait_call(driver::NetDriver::rx_index(0), 20ms);
  }
  (*s)->close();
  if (got != kFrames)
    return fail(Errc::broken, fmt::format("{} of {} frames came back", got, kFrames));
  if (mismatch) return fail(Errc::invalid_argument, "a frame came back changed");
  return {};
}

// A 4 KiB read at sector 8 that must match the image.
Result<> good_blk(const std::string& sock) {
  auto p = RawPeer::connect(sock);
  if (!p) return std::unexpected(p.error());
  RawPeer& peer = **p;
  if (auto u = peer.bring_up(1); !u) return u;
  constexpr std::size_t kHdr = RawPeer::kDataOffset, kBuf = kHdr + 4096, kStatus = kBuf + 4096;
  const virtio::VirtioBlkOutHdr h{virtio::blk_type::in, 0, 8};
  std::memcpy(peer.mem() + kHdr, &h, sizeof h);
  std::memset(peer.mem() + kBuf, 0, 4096);
  peer.mem()[kStatus] = 0xee;
  const virtq::DriverQueue::Buffer out{peer.gpa(kHdr), sizeof h};
  const virtq::DriverQueue::Buffer in[2] = {{peer.gpa(kBuf), 4096}, {peer.gpa(kStatus), 1}};
  if (!peer.queue(0).add(std::span(&out, 1), in, 1)) return fail(Errc::would_block, "ring full");
  peer.queue(0).publish();
  peer.kick(0);
  if (peer.wait_ring(0, 1, 20s) != RawPeer::RingEvent::used)
    return fail(Errc::broken, "read not answered");
  if (peer.mem()[kStatus] != virtio::kBlkSOk)
    return fail(Errc::broken, fmt::format("read status {}", peer.mem()[kStatus]));
  for (std::size_t i = 0; i < 4096; ++i) {
    if (peer.mem()[kBuf + i] != image_byte(8 * 512 + i))
      return fail(Errc::invalid_argument, "read data differs from the image");
  }
  return {};
}

Result<> good(const Child& c) {
  return c.target == Target::net ? good_net(c.sock) : good_blk(c.sock);
}

// ---- the run ----------------------------------------------------------------------------

struct Row {
  std::string target, klass, name, outcome;
  bool survived = false, served = false, ok = false;
  Sample delta;
};

struct Options {
  std::string net_bin, blk_bin, filter;
  unsigned cycles = 1000;
  // 2 MiB. Measured per-case growth is at most 64 KiB (glibc keeping the heap that the 509-slot
  // table used). The bound is half the hostile peer's 4 MiB shared region, so keeping a mapping of
  // it that the back-end had touched, or keeping >= 1 KiB per message of the 2000-message flood,
  // fails a case; smaller per-connection leaks add up in the cycle loop (2 KiB x 1000 cycles).
  long rss_bound_kib = 2048;
  // Mappings and threads: docs/security.md states deltas of 0 per case and over the cycles. The
  // child maps a peer's regions and starts its ring workers per session and must have let go of
  // all of them once the session is over; a leaked guest mapping or worker shows here even when
  // the backend never touched its pages (which RSS would not see).
  long maps_bound = 0;
  long threads_bound = 0;
  bool verbose = false;
};

// The checks every case and the cycle loop must pass, or why not.
std::string bounds_broken(const Sample& d, const Options& opt) {
  std::string why;
  if (d.fds != 0) why += fmt::format(" fds {:+}", d.fds);
  if (d.rss_kib > opt.rss_bound_kib)
    why += fmt::format(" RSS {:+} KiB > {}", d.rss_kib, opt.rss_bound_kib);
  if (d.maps > opt.maps_bound) why += fmt::format(" maps {:+} > {}", d.maps, opt.maps_bound);
  if (d.threads > opt.threads_bound)
    why += fmt::format(" threads {:+} > {}", d.threads, opt.threads_bound);
  return why;
}

bool run_case(Child& c, const Case& k, const Options& opt, Sample& before, std::vector<Row>& rows) {
  Row r;
  r.target = to_string(c.target);
  r.klass = k.klass;
  r.name = k.name;
  {
    auto peer = RawPeer::connect(c.sock);
    if (!peer) {
      r.outcome = "connect: " + peer.error().message();
    } else {
      auto o = k.run(**peer, c.target);
      r.outcome = o ? *o : "WRONG: " + o.error().message();
      r.ok = o.has_value();
    }
  }  // the hostile connection closes here
  r.survived = c.alive();
  if (r.survived) {
    auto g = good(c);
    r.served = g.has_value();
    if (!g) r.outcome += " | good session: " + g.error().message();
  }
  if (r.survived) {
    auto after = probe(c);
    if (after) {
      r.delta = {after->fds - before.fds, after->rss_kib - before.rss_kib,
                 after->maps - before.maps, after->threads - before.threads};
      before = *after;
    } else {
      r.served = false;
      r.outcome += " | probe: " + after.error().message();
    }
  }
  const std::string grew = bounds_broken(r.delta, opt);
  if (!grew.empty()) r.outcome += " | grew:" + grew;
  r.ok = r.ok && r.survived && r.served && grew.empty();
  if (!r.ok || opt.verbose) {
    std::printf("%s %-4s %-52s %s\n", r.ok ? "ok  " : "FAIL", r.target.c_str(), r.name.c_str(),
                r.outcome.c_str());
    if (!r.survived) std::printf("%s", log_tail(c.log, 20).c_str());
    std::fflush(stdout);
  }
  rows.push_back(std::move(r));
  return rows.back().survived;
}

struct CycleResult {
  unsigned done = 0;
  Sample delta;
  double seconds = 0;
  double slowest_ms = 0;
  std::string error;
};

CycleResult cycles(Child& c, unsigned n) {
  CycleResult res;
  auto before = probe(c);
  if (!before) {
    res.error = before.error().message();
    return res;
  }
  const auto t0 = Clock::now();
  for (; res.done < n; ++res.done) {
    const auto c0 = Clock::now();
    if (auto g = good(c); !g) {
      res.error = fmt::format("cycle {}: {}", res.done, g.error().message());
      break;
    }
    res.slowest_ms = std::max(res.slowest_ms,
                              std::chrono::duration<double, std::milli>(Clock::now() - c0).count());
  }
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  auto after = probe(c);
  if (!after) {
    res.error += " probe: " + after.error().message();
    return res;
  }
  res.delta = {after->fds - before->fds, after->rss_kib - before->rss_kib,
               after->maps - before->maps, after->threads - before->threads};
  return res;
}

bool write_image(const std::string& path) {
  std::vector<std::uint8_t> img(1u << 20);
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = image_byte(i);
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(img.size()));
  return f.good();
}

int run(const Options& opt) {
  char tmpl[] = "/tmp/vk-hostile-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string dir = tmpl;
  std::vector<Child> children;
  if (!opt.net_bin.empty()) {
    auto c = spawn(Target::net, opt.net_bin, {"--socket-path=" + dir + "/net.sock", "--loopback"},
                   dir + "/net.sock", dir + "/net.log");
    if (c) children.push_back(*c);
  }
  // The image goes to /dev/shm when there is one: O_DIRECT writes to a disk-backed /tmp can
  // stall for most of a second on a loaded host, which would only slow the run down.
  const std::string image = std::filesystem::is_directory("/dev/shm")
                                ? fmt::format("/dev/shm/vk-hostile-{}.img", ::getpid())
                                : dir + "/disk.img";
  if (!opt.blk_bin.empty()) {
    if (!write_image(image)) {
      std::fprintf(stderr, "hostile_peer: cannot write %s\n", image.c_str());
      return 1;
    }
    auto c =
        spawn(Target::blk, opt.blk_bin, {"--socket-path=" + dir + "/blk.sock", "--image=" + image},
              dir + "/blk.sock", dir + "/blk.log");
    if (c) children.push_back(*c);
  }

  if (!kCountAnonMaps)
    std::printf("AddressSanitizer build: mapping deltas count file-backed mappings only\n");
  std::vector<Case> all = message_cases();
  for (auto& k : ring_cases()) all.push_back(std::move(k));

  std::vector<Row> rows;
  std::vector<std::string> cycle_lines;
  bool ok = true;
  const auto t0 = Clock::now();
  for (Child& c : children) {
    // Until it listens (a sanitizer build starts slowly).
    if (auto up = probe(c); !up) {
      std::printf("FAIL %s: never answered on %s: %s\n%s", to_string(c.target), c.sock.c_str(),
                  up.error().message().c_str(), log_tail(c.log, 20).c_str());
      ok = false;
      continue;
    }
    // Warm-up: a few good sessions, so allocator and first-use growth is not counted.
    for (int i = 0; i < 5; ++i) {
      if (auto g = good(c); !g) {
        std::printf("FAIL %s: warm-up session: %s\n%s", to_string(c.target),
                    g.error().message().c_str(), log_tail(c.log, 20).c_str());
        ok = false;
        break;
      }
    }
    auto before = probe(c);
    if (!before) {
      std::printf("FAIL %s: probe: %s\n", to_string(c.target), before.error().message().c_str());
      ok = false;
      continue;
    }
    const Sample start = *before;
    for (const Case& k : all) {
      if (!(c.target == Target::net ? k.net : k.blk)) continue;
      if (!opt.filter.empty() && k.name.find(opt.filter) == std::string::npos) continue;
      if (!run_case(c, k, opt, *before, rows)) break;  // the child died: nothing more to learn
    }
    if (auto end_probe = c.alive() ? probe(c) : Result<Sample>(fail(Errc::disconnected, "dead"));
        end_probe) {
      const Sample end = *end_probe;
      std::printf("%s: over all cases: fds %+ld, RSS %+ld KiB, maps %+ld, threads %+ld\n",
                  to_string(c.target), end.fds - start.fds, end.rss_kib - start.rss_kib,
                  end.maps - start.maps, end.threads - start.threads);
    }
    if (opt.cycles > 0 && c.alive()) {
      const CycleResult cr = cycles(c, opt.cycles);
      const std::string grew = bounds_broken(cr.delta, opt);
      const bool cyc_ok = cr.error.empty() && cr.done == opt.cycles && grew.empty();
      ok = ok && cyc_ok;
      cycle_lines.push_back(fmt::format(
          "{} {}: {} connect/negotiate/traffic/disconnect cycles of {} in {:.1f} s (slowest {:.0f} "
          "ms): "
          "fd delta {:+}, RSS delta {:+} KiB, maps {:+}, threads {:+}{}{}",
          cyc_ok ? "ok  " : "FAIL", to_string(c.target), cr.done, opt.cycles, cr.seconds,
          cr.slowest_ms, cr.delta.fds, cr.delta.rss_kib, cr.delta.maps, cr.delta.threads,
          cr.error.empty() ? "" : " -- " + cr.error, grew.empty() ? "" : " -- grew:" + grew));
    }
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();

  // The table.
  std::printf("\n%-4s %-10s %-54s %-8s %-6s %5s %8s %5s %7s  %s\n", "dev", "class", "case",
              "survived", "served", "fd", "RSS KiB", "maps", "threads", "outcome");
  std::size_t survived = 0, passed = 0;
  long max_fd = 0, max_rss = 0, max_maps = 0, max_threads = 0;
  for (const Row& r : rows) {
    std::printf("%-4s %-10s %-54.54s %-8s %-6s %+5ld %+8ld %+5ld %+7ld  %s%s\n", r.target.c_str(),
                r.klass.c_str(), r.name.c_str(), r.survived ? "yes" : "NO", r.served ? "yes" : "NO",
                r.delta.fds, r.delta.rss_kib, r.delta.maps, r.delta.threads, r.ok ? "" : "FAIL ",
                r.outcome.c_str());
    survived += r.survived;
    passed += r.ok;
    max_fd = std::max(max_fd, std::labs(r.delta.fds));
    max_rss = std::max(max_rss, r.delta.rss_kib);
    max_maps = std::max(max_maps, r.delta.maps);
    max_threads = std::max(max_threads, r.delta.threads);
  }
  for (const auto& l : cycle_lines) std::printf("%s\n", l.c_str());

  // Stop the children the way an operator does: SIGTERM, exit 0.
  for (Child& c : children) {
    if (!c.alive()) {
      ok = false;
      continue;
    }
    ::kill(c.pid, SIGTERM);
    // Generous: an ASan child runs LeakSanitizer at exit, and the host may be loaded.
    const auto deadline = Clock::now() + 30s;
    while (c.alive() && Clock::now() < deadline) std::this_thread::sleep_for(20ms);
    if (c.alive()) {
      ::kill(c.pid, SIGKILL);
      ::waitpid(c.pid, &c.status, 0);
      std::printf("FAIL %s: did not exit within 30 s of SIGTERM\n", to_string(c.target));
      ok = false;
    } else if (!WIFEXITED(c.status) || WEXITSTATUS(c.status) != 0) {
      std::printf("FAIL %s: exit status 0x%x after SIGTERM\n", to_string(c.target), c.status);
      ok = false;
    }
  }
  ok = ok && passed == rows.size() && !rows.empty();
  std::printf(
      "\n%zu cases, %zu survived, %zu passed every check; max |fd delta| %ld, max RSS delta %ld "
      "KiB "
      "(bound %ld), max maps delta %+ld (bound %ld), max threads delta %+ld (bound %ld); %.1f s\n",
      rows.size(), survived, passed, max_fd, max_rss, opt.rss_bound_kib, max_maps, opt.maps_bound,
      max_threads, opt.threads_bound, secs);
  std::filesystem::remove(image);
  if (ok) {
    std::filesystem::remove_all(dir);
  } else {
    std::printf("logs kept in %s\n", dir.c_str());
  }
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace vhostkit::hostile

int main(int argc, char** argv) {
  vhostkit::hostile::Options opt;
  CLI::App app(
      "hostile_peer: every class of hostile vhost-user input against the real back-end "
      "programs, with fd, RSS, mapping and thread accounting");
  app.add_option("--net", opt.net_bin, "path of vhostkit-net (run with --loopback)");
  app.add_option("--blk", opt.blk_bin, "path of vhostkit-blk (run on a temporary image)");
  app.add_option("--cycles", opt.cycles, "connect/traffic/disconnect cycles after the cases")
      ->capture_default_str();
  app.add_option("--rss-bound-kib", opt.rss_bound_kib, "largest RSS growth allowed per case")
      ->capture_default_str();
  app.add_option("--maps-bound", opt.maps_bound, "most mappings a case may add")
      ->capture_default_str();
  app.add_option("--threads-bound", opt.threads_bound, "most threads a case may add")
      ->capture_default_str();
  app.add_option("--filter", opt.filter, "run only cases whose name contains this");
  app.add_flag("-v,--verbose", opt.verbose, "a line per case as it runs");
  CLI11_PARSE(app, argc, argv);
  if (opt.net_bin.empty() && opt.blk_bin.empty()) {
    std::fprintf(stderr, "hostile_peer: give --net=PATH and/or --blk=PATH\n");
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);
  return vhostkit::hostile::run(opt);
}
