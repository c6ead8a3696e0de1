#include "report.h"

#include <fmt/format.h>

#include <sys/stat.h>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <span>

namespace vhostkit::bench {

std::string_view to_string(Mode m) noexcept {
  switch (m) {
    case Mode::txonly: return "txonly";
    case Mode::rxonly: return "rxonly";
    case Mode::loop: return "loop";
    case Mode::fwd: return "fwd";
    case Mode::latency: return "latency";
    case Mode::blk: return "blk";
  }
  return "?";
}

Result<Mode> parse_mode(std::string_view s) {
  for (Mode m : {Mode::txonly, Mode::rxonly, Mode::loop, Mode::fwd, Mode::latency, Mode::blk}) {
    if (s == to_string(m)) return m;
  }
  return fail(Errc::invalid_argument,
              fmt::format("mode '{}' is not one of txonly, rxonly, loop, fwd, latency, blk", s));
}

Result<> check_mode_options(Mode m, const std::vector<std::string>& given) {
  const auto& wrong = is_net(m) ? std::span<const std::string_view>(kBlkOnlyOptions)
                                : std::span<const std::string_view>(kNetOnlyOptions);
  for (const std::string& g : given) {
    for (std::string_view w : wrong) {
      if (g == w) {
        return fail(Errc::invalid_argument,
                    fmt::format("{} is for {} only, not for mode {}", w,
                                is_net(m) ? "mode blk" : "the net modes", to_string(m)));
      }
    }
  }
  return {};
}

Result<std::vector<std::string>> check_negotiated(std::string_view asked_ring, bool asked_in_order,
                                                  std::string_view got_ring, bool got_in_order,
                                                  bool strict) {
  std::vector<std::string> notes;
  if (asked_ring != got_ring) {
    notes.push_back(
        fmt::format("asked for --ring={}, but the back-end offers the {} ring only: "
                    "running {}",
                    asked_ring, got_ring, got_ring));
  }
  if (asked_in_order && !got_in_order) {
    notes.push_back(
        "asked for --in-order, but the back-end does not offer VIRTIO_F_IN_ORDER: running "
        "without it");
  }
  if (strict && !notes.empty()) {
    std::string& n = notes.front();
    return fail(Errc::unsupported, n.substr(0, n.find(": running")) + " (--strict)");
  }
  return notes;
}

std::string_view to_string(BlkRw rw) noexcept {
  return rw == BlkRw::randread ? "randread" : "randwrite";
}

Result<BlkRw> parse_rw(std::string_view s) {
  for (BlkRw rw : {BlkRw::randread, BlkRw::randwrite}) {
    if (s == to_string(rw)) return rw;
  }
  return fail(Errc::invalid_argument, fmt::format("--rw: '{}' is not randread or randwrite", s));
}

Result<> check_bs(std::uint32_t bs, std::uint32_t max) {
  if (bs < 512 || bs > max || bs % 512 != 0) {
    return fail(Errc::out_of_range,
                fmt::format("--bs: {} is not a multiple of 512 in 512..{}", bs, max));
  }
  return {};
}

Result<std::vector<std::uint32_t>> parse_sizes(std::string_view s, std::uint32_t min,
                                               std::uint32_t max) {
  std::vector<std::uint32_t> out;
  std::size_t pos = 0;
  for (;;) {
    const std::size_t comma = s.find(',', pos);
    const std::string_view item =
        s.substr(pos, comma == std::string_view::npos ? s.npos : comma - pos);
    std::uint32_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc{} || end != item.data() + item.size()) {
      return fail(Errc::invalid_argument, fmt::format("--size: '{}' is not a number", item));
    }
    if (v < min || v > max) {
      return fail(Errc::out_of_range, fmt::format("--size: {} is outside {}..{}", v, min, max));
    }
    out.push_back(v);
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return out;
}

namespace {

// RFC 4180: a field with a comma, quote or newline is quoted, quotes doubled.
std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + '"';
}

bool is_latency(const RunResult& r) { return r.mode == Mode::latency; }

template <typename R, typename Row>
Result<> append_rows(const std::string& path, const std::string& header,
                     const std::vector<R>& results, Row&& row) {
  struct stat st{};
  const bool fresh = ::stat(path.c_str(), &st) != 0 || st.st_size == 0;
  std::ofstream f(path, std::ios::app);
  if (!f) return fail_errno(fmt::format("open {} for append", path));
  if (fresh) f << header << '\n';
  for (const R& r : results) f << row(r) << '\n';
  f.flush();
  if (!f) return fail_errno(fmt::format("write {}", path));
  return {};
}

}  // namespace

std::string csv_header() {
  // ring and in_order last: scripts read the older columns by position.
  return "utc,label,mode,size,poll,burst,queues,seconds,pps,mpps,gbps,tx_pps,rx_pps,tx,rx,drops,"
         "samples,p50_us,p99_us,p999_us,min_us,max_us,mean_us,ring,in_order";
}

std::string csv_row(const RunResult& r, std::string_view utc) {
  std::string row = fmt::format(
      "{},{},{},{},{},{},{},{:.3f},{:.0f},{:.4f},{:.4f},{:.0f},{:.0f},{},{},{}", csv_field(utc),
      csv_field(r.label), to_string(r.mode), r.size, csv_field(r.poll), r.burst, r.queues,
      r.seconds, r.pps(), r.pps() / 1e6, r.gbps(), r.tx_pps, r.rx_pps, r.tx, r.rx, r.drops);
  if (is_latency(r)) {
    row += fmt::format(",{},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f}", r.samples, r.p50_us,
                       r.p99_us, r.p999_us, r.min_us, r.max_us, r.mean_us);
  } else {
    row += ",,,,,,,";
  }
  row += fmt::format(",{},{}", csv_field(r.ring), r.in_order ? 1 : 0);
  return row;
}

Result<> append_csv(const std::string& path, const std::vector<RunResult>& results,
                    std::string_view utc) {
  return append_rows(path, csv_header(), results,
                     [&](const RunResult& r) { return csv_row(r, utc); });
}

std::string blk_csv_header() {
  return "utc,label,mode,rw,bs,iodepth,queues,poll,seconds,iops,mb_per_s,requests,total,errors,"
         "samples,p50_us,p99_us,p999_us,min_us,max_us,mean_us,ring,in_order";
}

std::string blk_csv_row(const BlkResult& r, std::string_view utc) {
  return fmt::format(
      "{},{},blk,{},{},{},{},{},{:.3f},{:.0f},{:.2f},{},{},{},{},{:.3f},{:.3f},{:.3f},"
      "{:.3f},{:.3f},{:.3f},{},{}",
      csv_field(utc), csv_field(r.label), to_string(r.rw), r.bs, r.iodepth, r.queues,
      csv_field(r.poll), r.seconds, r.iops, r.mb_per_s(), r.requests, r.total, r.errors, r.samples,
      r.p50_us, r.p99_us, r.p999_us, r.min_us, r.max_us, r.mean_us, csv_field(r.ring),
      r.in_order ? 1 : 0);
}

Result<> append_blk_csv(const std::string& path, const std::vector<BlkResult>& results,
                        std::string_view utc) {
  return append_rows(path, blk_csv_header(), results,
                     [&](const BlkResult& r) { return blk_csv_row(r, utc); });
}

nlohmann::json to_json(const BlkResult& r) {
  return {{"label", r.label},       {"mode", "blk"},
          {"rw", to_string(r.rw)},  {"bs", r.bs},
          {"iodepth", r.iodepth},   {"queues", r.queues},
          {"poll", r.poll},         {"ring", r.ring},
          {"in_order", r.in_order}, {"seconds", r.seconds},
          {"iops", r.iops},         {"mb_per_s", r.mb_per_s()},
          {"requests", r.requests}, {"total", r.total},
          {"errors", r.errors},     {"samples", r.samples},
          {"p50_us", r.p50_us},     {"p99_us", r.p99_us},
          {"p999_us", r.p999_us},   {"min_us", r.min_us},
          {"max_us", r.max_us},     {"mean_us", r.mean_us}};
}

std::string format_blk_table(const std::vector<BlkResult>& results) {
  constexpr std::string_view kFmt =
      "{:<9} {:>7} {:>7} {:>6} {:>6} {:>6} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9}\n";
  std::string out =
      fmt::format(fmt::runtime(kFmt), "rw", "bs", "iodepth", "queues", "poll", "ring", "in-order",
                  "IOPS", "MB/s", "errors", "p50 us", "p99 us", "p99.9 us");
  for (const BlkResult& r : results) {
    out +=
        fmt::format(fmt::runtime(kFmt), to_string(r.rw), r.bs, r.iodepth, r.queues, r.poll, r.ring,
                    r.in_order ? "yes" : "no", fmt::format("{:.0f}", r.iops),
                    fmt::format("{:.1f}", r.mb_per_s()), r.errors, fmt::format("{:.2f}", r.p50_us),
                    fmt::format("{:.2f}", r.p99_us), fmt::format("{:.2f}", r.p999_us));
  }
  return out;
}

std::string format_blk_live(double t, double iops, std::uint32_t bs, std::uint64_t errors) {
  return fmt::format("{:6.1f}s  {:10.0f} IOPS  {:9.1f} MB/s  errors {}", t, iops, iops * bs / 1e6,
                     errors);
}

nlohmann::json to_json(const RunResult& r) {
  nlohmann::json j = {{"label", r.label},
                      {"mode", to_string(r.mode)},
                      {"size", r.size},
                      {"poll", r.poll},
                      {"ring", r.ring},
                      {"in_order", r.in_order},
                      {"burst", r.burst},
                      {"queues", r.queues},
                      {"seconds", r.seconds},
                      {"pps", r.pps()},
                      {"mpps", r.pps() / 1e6},
                      {"gbps", r.gbps()},
                      {"tx_pps", r.tx_pps},
                      {"rx_pps", r.rx_pps},
                      {"tx", r.tx},
                      {"rx", r.rx},
                      {"drops", r.drops}};
  if (is_latency(r)) {
    j["samples"] = r.samples;
    j["p50_us"] = r.p50_us;
    j["p99_us"] = r.p99_us;
    j["p999_us"] = r.p999_us;
    j["min_us"] = r.min_us;
    j["max_us"] = r.max_us;
    j["mean_us"] = r.mean_us;
  }
  return j;
}

std::string format_table(const std::vector<RunResult>& results) {
  constexpr std::string_view kFmt =
      "{:<8} {:>5} {:>6} {:>6} {:>8} {:>9} {:>9} {:>8} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}\n";
  std::string out =
      fmt::format(fmt::runtime(kFmt), "mode", "size", "poll", "ring", "in-order", "tx Mpps",
                  "rx Mpps", "Gbit/s", "tx", "rx", "drops", "p50 us", "p99 us", "p99.9 us");
  for (const RunResult& r : results) {
    const auto us = [&](double v) {
      return is_latency(r) ? fmt::format("{:.2f}", v) : std::string("-");
    };
    out += fmt::format(fmt::runtime(kFmt), to_string(r.mode), r.size, r.poll, r.ring,
                       r.in_order ? "yes" : "no", fmt::format("{:.3f}", r.tx_pps / 1e6),
                       fmt::format("{:.3f}", r.rx_pps / 1e6), fmt::format("{:.3f}", r.gbps()), r.tx,
                       r.rx, r.drops, us(r.p50_us), us(r.p99_us), us(r.p999_us));
  }
  return out;
}

std::string format_live(double t, double tx_pps, double rx_pps, std::uint32_t size,
                        std::uint64_t lost) {
  const double gbps = std::max(tx_pps, rx_pps) * size * 8.0 / 1e9;
  return fmt::format("{:6.1f}s  tx {:7.3f} Mpps  rx {:7.3f} Mpps  {:7.3f} Gbit/s  drops {}", t,
                     tx_pps / 1e6, rx_pps / 1e6, gbps, lost);
}

}  // namespace vhostkit::bench
