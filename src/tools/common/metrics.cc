#include "metrics.h"

#include <fmt/format.h>

#include "vhostkit/blk/blk_device.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::cli::metrics {
namespace {

std::string escape(std::string_view v, bool quote) {
  std::string out;
  out.reserve(v.size());
  for (char ch : v) {
    if (ch == '\\') {
      out += "\\\\";
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '"' && quote) {
      out += "\\\"";
    } else {
      out += ch;
    }
  }
  return out;
}

std::string_view kind_name(Kind k) { return k == Kind::counter ? "counter" : "gauge"; }

Sample queue_sample(std::uint32_t queue, std::uint64_t value) {
  return Sample{{{"queue", std::to_string(queue)}}, value};
}

}  // namespace

Family& Snapshot::family(std::string_view name, std::string_view help, Kind kind) {
  for (Family& f : families_) {
    if (f.name == name) return f;
  }
  families_.push_back(Family{std::string(name), std::string(help), kind, {}});
  return families_.back();
}

std::string to_prometheus(const Snapshot& s) {
  std::string out;
  for (const Family& f : s.families()) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", f.name, escape(f.help, false), f.name,
                       kind_name(f.kind));
    for (const Sample& smp : f.samples) {
      out += f.name;
      if (!smp.labels.empty()) {
        out += '{';
        for (std::size_t i = 0; i < smp.labels.size(); ++i) {
          if (i > 0) out += ',';
          out += fmt::format("{}=\"{}\"", smp.labels[i].first, escape(smp.labels[i].second, true));
        }
        out += '}';
      }
      out += fmt::format(" {}\n", smp.value);
    }
  }
  return out;
}

nlohmann::json to_json(const Snapshot& s) {
  nlohmann::json out = nlohmann::json::object();
  for (const Family& f : s.families()) {
    nlohmann::json samples = nlohmann::json::array();
    for (const Sample& smp : f.samples) {
      nlohmann::json labels = nlohmann::json::object();
      for (const auto& [k, v] : smp.labels) labels[k] = v;
      samples.push_back({{"labels", std::move(labels)}, {"value", smp.value}});
    }
    out[f.name] = {{"type", kind_name(f.kind)}, {"help", f.help}, {"samples", std::move(samples)}};
  }
  return out;
}

void add_device(Snapshot& s, std::string_view device, vhost::Device& dev, const Connection& c) {
  const std::string p = fmt::format("vhostkit_{}_", device);
  s.add(p + "connected", "1 while a vhost-user front-end is connected", Kind::gauge,
        {{}, c.connected ? 1u : 0u});
  s.add(p + "sessions_total", "front-end sessions started since the program started", Kind::counter,
        {{}, c.sessions});
  // The backend's own bits (fixed) and whatever was acked: offered_features() also reads the
  // session's extra bits, which only the control thread may read.
  const std::uint64_t acked = dev.features();
  const std::uint64_t offered = dev.backend().features() | acked;
  for (unsigned b = 0; b < 64; ++b) {
    const std::uint64_t m = std::uint64_t{1} << b;
    if ((offered & m) == 0) continue;
    s.add(p + "feature_acked",
          "per feature bit the back-end offers: 1 if the front-end acked it (SET_FEATURES)",
          Kind::gauge, {{{"bit", std::to_string(b)}}, (acked & m) != 0 ? 1u : 0u});
  }
  std::uint64_t started = 0;
  for (std::uint32_t i = 0; i < dev.num_queues(); ++i) started += dev.queue(i).started() ? 1 : 0;
  s.add(p + "queues_started", "virtqueues running on a worker", Kind::gauge, {{}, started});
  for (std::uint32_t i = 0; i < dev.num_queues(); ++i) {
    const vhost::Queue& q = dev.queue(i);
    const vhost::QueueStats& st = q.stats();
    s.add(p + "queue_started", "1 while the virtqueue runs on a worker", Kind::gauge,
          queue_sample(i, q.started() ? 1 : 0));
    s.add(p + "queue_broken", "1 once the virtqueue broke the protocol and was stopped",
          Kind::gauge, queue_sample(i, q.broken() ? 1 : 0));
    s.add(p + "ring_size", "virtqueue size (SET_VRING_NUM), 0 before the front-end sets it",
          Kind::gauge, queue_sample(i, q.ring_size()));
    // The ring counters restart at 0 with each session (the queue is reset at its end).
    s.add(p + "kicks_total", "kick eventfd wake-ups received (this session)", Kind::counter,
          queue_sample(i, st.kicks.load()));
    s.add(p + "calls_total", "call eventfd signals sent (this session)", Kind::counter,
          queue_sample(i, st.calls.load()));
    s.add(p + "chains_total",
          "descriptor chains popped, where the device counts them (this session)", Kind::counter,
          queue_sample(i, st.chains.load()));
    s.add(p + "ring_bytes_total", "bytes moved, where the device counts them (this session)",
          Kind::counter, queue_sample(i, st.bytes.load()));
    s.add(p + "ring_errors_total", "malformed descriptor chains (this session)", Kind::counter,
          queue_sample(i, st.errors.load()));
  }
}

void add_net(Snapshot& s, const net::NetDevice& dev) {
  for (std::uint16_t qp = 0; qp < dev.queue_pairs(); ++qp) {
    const net::NetStats t = dev.stats(qp);
    const std::uint32_t rxq = 2u * qp;
    const std::uint32_t txq = 2u * qp + 1;
    auto c = [&](std::string_view name, std::string_view help, std::uint32_t q, std::uint64_t v) {
      s.add(fmt::format("vhostkit_net_{}_total", name), help, Kind::counter, queue_sample(q, v));
    };
    c("tx_frames", "frames the guest sent (transmitq), to the port or the loopback", txq,
      t.tx_frames);
    c("tx_bytes", "bytes of the frames the guest sent, virtio-net header excluded", txq,
      t.tx_bytes);
    c("tx_drops", "guest frames the port refused, or the loopback had no rx buffer for", txq,
      t.tx_drops);
    c("tx_errors", "malformed transmit chains", txq, t.tx_errors);
    c("rx_frames", "frames delivered to the guest (receiveq)", rxq, t.rx_frames);
    c("rx_bytes", "bytes of the frames delivered to the guest, header excluded", rxq, t.rx_bytes);
    c("rx_drops", "frames that did not fit the guest's receive buffers", rxq, t.rx_drops);
    c("rx_errors", "malformed receive chains (no room for the header)", rxq, t.rx_errors);
  }
  s.add("vhostkit_net_ctrl_errors_total", "control queue commands refused or malformed",
        Kind::counter, {{}, dev.ctrl_errors()});
  s.add("vhostkit_net_active_pairs", "queue pairs the driver enabled (VIRTIO_NET_CTRL_MQ)",
        Kind::gauge, {{}, dev.active_pairs()});
}

void add_blk(Snapshot& s, const blk::BlkDevice& dev) {
  for (std::uint16_t q = 0; q < dev.num_queues(); ++q) {
    const blk::BlkStats t = dev.stats(q);
    auto c = [&](std::string_view name, std::string_view help, std::uint64_t v) {
      s.add(fmt::format("vhostkit_blk_{}_total", name), help, Kind::counter, queue_sample(q, v));
    };
    c("reads", "read requests completed OK", t.reads);
    c("writes", "write requests completed OK", t.writes);
    c("flushes", "flush requests completed", t.flushes);
    c("discards", "discard and write-zeroes requests completed OK", t.discards);
    c("get_ids", "GET_ID requests answered", t.get_ids);
    c("read_bytes", "bytes read for the guest", t.bytes_read);
    c("written_bytes", "bytes written for the guest", t.bytes_written);
    c("io_errors", "requests the backing store failed (VIRTIO_BLK_S_IOERR)", t.io_errors);
    c("bad_requests", "malformed requests answered with IOERR or UNSUPP", t.bad_requests);
    c("no_status", "malformed chains with no status byte (used length 0)", t.no_status);
    c("buffered", "requests sent through the buffered fd (not aligned for O_DIRECT)", t.buffered);
  }
}

}  // namespace vhostkit::cli::metrics
