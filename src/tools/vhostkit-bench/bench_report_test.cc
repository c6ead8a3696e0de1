// Pure logic of vhostkit-bench: the histogram's percentiles, size/mode parsing, the CSV, table
// and JSON output, and the frame format the latency mode relies on.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "histogram.h"
#include "report.h"
#include "traffic.h"

namespace vb = vhostkit::bench;

namespace {

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

vb::RunResult loop_result() {
  vb::RunResult r;
  r.label = "cfg4";
  r.mode = vb::Mode::loop;
  r.size = 64;
  r.poll = "busy";
  r.burst = 32;
  r.seconds = 3.0;
  r.tx = 3000;
  r.rx = 2990;
  r.drops = 10;
  r.tx_pps = 2.5e6;
  r.rx_pps = 2.0e6;
  return r;
}

}  // namespace

TEST(Histogram, EmptyReportsZero) {
  vb::Histogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.percentile(0.5), 0u);
  EXPECT_EQ(h.min(), 0u);
  EXPECT_EQ(h.max(), 0u);
  EXPECT_EQ(h.mean(), 0.0);
}

TEST(Histogram, SmallValuesAreExact) {
  vb::Histogram h;
  for (std::uint64_t v = 1; v <= 50; ++v) h.record(v);
  EXPECT_EQ(h.percentile(0.5), 25u);
  EXPECT_EQ(h.percentile(0.99), 50u);  // ceil(49.5) = 50th sample
  EXPECT_EQ(h.percentile(0.02), 1u);
  EXPECT_EQ(h.min(), 1u);
  EXPECT_EQ(h.max(), 50u);
  EXPECT_DOUBLE_EQ(h.mean(), 25.5);
}

TEST(Histogram, PercentilesOfUniformWithinBucketPrecision) {
  vb::Histogram h;
  for (std::uint64_t v = 1; v <= 100000; ++v) h.record(v);
  const auto near = [](std::uint64_t got, double want) {
    return std::abs(static_cast<double>(got) - want) <= want / 64.0 + 1;
  };
  EXPECT_TRUE(near(h.percentile(0.5), 50000)) << h.percentile(0.5);
  EXPECT_TRUE(near(h.percentile(0.99), 99000)) << h.percentile(0.99);
  EXPECT_TRUE(near(h.percentile(0.999), 99900)) << h.percentile(0.999);
  EXPECT_EQ(h.percentile(0.0), 1u);
  EXPECT_EQ(h.percentile(1.0), 100000u);
}

TEST(Histogram, TailSeparatesFromBody) {
  // 990 fast round trips and 10 slow ones: p50 is fast, p99.9 is slow, p99 is at the boundary.
  vb::Histogram h;
  for (int i = 0; i < 990; ++i) h.record(20'000);
  for (int i = 0; i < 10; ++i) h.record(5'000'000);
  EXPECT_NEAR(static_cast<double>(h.percentile(0.5)), 20'000, 20'000 / 64.0);
  EXPECT_NEAR(static_cast<double>(h.percentile(0.99)), 20'000, 20'000 / 64.0);
  EXPECT_NEAR(static_cast<double>(h.percentile(0.999)), 5'000'000, 5'000'000 / 64.0);
  EXPECT_EQ(h.max(), 5'000'000u);
}

TEST(Histogram, ResultIsClampedToObservedRange) {
  vb::Histogram h;
  h.record(1'000'003);
  EXPECT_EQ(h.percentile(0.5), 1'000'003u);  // one sample: min = max clamps the bucket middle
}

TEST(Histogram, BucketsCoverEveryValueInOrder) {
  for (std::uint64_t v :
       {0ull, 1ull, 63ull, 64ull, 65ull, 127ull, 128ull, 1000ull, 123456789ull, ~0ull}) {
    const std::size_t b = vb::Histogram::bucket_of(v);
    ASSERT_LT(b, vb::Histogram::kBuckets);
    EXPECT_LE(vb::Histogram::bucket_low(b), v);
    EXPECT_GE(vb::Histogram::bucket_low(b) + (vb::Histogram::bucket_width(b) - 1), v);
    if (v > 0) {
      EXPECT_LE(vb::Histogram::bucket_of(v - 1), b);
    }
  }
}

TEST(Histogram, MergeAddsCountsAndExtremes) {
  vb::Histogram a, b;
  a.record(10);
  a.record(20);
  b.record(5);
  b.record(1000);
  a.merge(b);
  EXPECT_EQ(a.count(), 4u);
  EXPECT_EQ(a.min(), 5u);
  EXPECT_EQ(a.max(), 1000u);
  EXPECT_EQ(a.percentile(0.5), 10u);
}

TEST(ParseSizes, OneAndList) {
  auto one = vb::parse_sizes("64", 60, 2036);
  ASSERT_TRUE(one);
  EXPECT_EQ(*one, std::vector<std::uint32_t>{64});
  auto many = vb::parse_sizes("64,256,512,1024,1518", 60, 2036);
  ASSERT_TRUE(many);
  EXPECT_EQ(*many, (std::vector<std::uint32_t>{64, 256, 512, 1024, 1518}));
}

TEST(ParseSizes, RejectsGarbageEmptyAndOutOfRange) {
  for (const char* s : {"", ",", "64,", ",64", "abc", "64x", "-64", "64,,128", " 64"}) {
    EXPECT_FALSE(vb::parse_sizes(s, 60, 2036)) << "'" << s << "'";
  }
  auto small = vb::parse_sizes("59", 60, 2036);
  ASSERT_FALSE(small);
  EXPECT_NE(small.error().message().find("59"), std::string::npos);
  EXPECT_FALSE(vb::parse_sizes("2037", 60, 2036));
  EXPECT_FALSE(vb::parse_sizes("99999999999", 60, 2036));
}

TEST(ParseMode, KnownAndUnknown) {
  EXPECT_EQ(vb::parse_mode("txonly").value(), vb::Mode::txonly);
  EXPECT_EQ(vb::parse_mode("rxonly").value(), vb::Mode::rxonly);
  EXPECT_EQ(vb::parse_mode("loop").value(), vb::Mode::loop);
  EXPECT_EQ(vb::parse_mode("latency").value(), vb::Mode::latency);
  EXPECT_FALSE(vb::parse_mode("Loop"));
  EXPECT_FALSE(vb::parse_mode(""));
}

TEST(RunResult, HeadlineRateFollowsMode) {
  vb::RunResult r = loop_result();
  EXPECT_DOUBLE_EQ(r.pps(), 2.0e6);  // loop: round trips
  EXPECT_NEAR(r.gbps(), 2.0e6 * 64 * 8 / 1e9, 1e-9);
  r.mode = vb::Mode::txonly;
  EXPECT_DOUBLE_EQ(r.pps(), 2.5e6);
}

TEST(Csv, RowHasAColumnPerHeaderField) {
  const auto fields = [](const std::string& s) { return std::count(s.begin(), s.end(), ',') + 1; };
  vb::RunResult r = loop_result();
  EXPECT_EQ(fields(vb::csv_row(r, "2024-01-01T00:00:00Z")), fields(vb::csv_header()));
  r.mode = vb::Mode::latency;
  r.p50_us = 12.5;
  const std::string row = vb::csv_row(r, "t");
  EXPECT_EQ(fields(row), fields(vb::csv_header()));
  EXPECT_NE(row.find(",12.500,"), std::string::npos) << row;
  EXPECT_NE(
      vb::csv_row(loop_result(), "t").find(",cfg4,loop,64,busy,32,1,3.000,2000000,2.0000,1.0240,"),
      std::string::npos)
      << vb::csv_row(loop_result(), "t");
}

TEST(Csv, LayoutAndInOrderAreTheLastColumns) {
  vb::RunResult r = loop_result();
  EXPECT_TRUE(vb::csv_header().ends_with(",mean_us,ring,in_order"));
  EXPECT_TRUE(vb::csv_row(r, "t").ends_with(",,,,,,,split,0")) << vb::csv_row(r, "t");
  r.ring = "packed";
  r.in_order = true;
  EXPECT_TRUE(vb::csv_row(r, "t").ends_with(",packed,1")) << vb::csv_row(r, "t");
}

TEST(CheckNegotiated, NotesEachDifferenceOrFailsWhenStrict) {
  auto same = vb::check_negotiated("packed", true, "packed", true, true);
  ASSERT_TRUE(same);
  EXPECT_TRUE(same->empty());
  // Not asking for IN_ORDER and getting it anyway is no difference worth a line.
  auto more = vb::check_negotiated("split", false, "split", true, false);
  ASSERT_TRUE(more);
  EXPECT_TRUE(more->empty());
  auto both = vb::check_negotiated("packed", true, "split", false, false);
  ASSERT_TRUE(both);
  ASSERT_EQ(both->size(), 2u);
  EXPECT_EQ((*both)[0],
            "asked for --ring=packed, but the back-end offers the split ring only: running split");
  EXPECT_NE((*both)[1].find("VIRTIO_F_IN_ORDER"), std::string::npos);
  auto strict = vb::check_negotiated("packed", false, "split", false, true);
  ASSERT_FALSE(strict);
  EXPECT_EQ(strict.error().detail,
            "asked for --ring=packed, but the back-end offers the split ring only (--strict)");
  auto strict_io = vb::check_negotiated("split", true, "split", false, true);
  ASSERT_FALSE(strict_io);
  EXPECT_NE(strict_io.error().detail.find("--in-order"), std::string::npos);
}

TEST(Csv, LabelWithCommaOrQuoteIsQuoted) {
  vb::RunResult r = loop_result();
  r.label = "a,b \"c\"";
  EXPECT_NE(vb::csv_row(r, "t").find(",\"a,b \"\"c\"\"\",loop,"), std::string::npos);
}

TEST(Csv, AppendWritesHeaderOnlyOnce) {
  char tmpl[] = "/tmp/vhostkit-bench-csv-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  ::close(fd);  // exists and is empty: counts as new
  ASSERT_TRUE(vb::append_csv(tmpl, {loop_result()}, "t1"));
  ASSERT_TRUE(vb::append_csv(tmpl, {loop_result(), loop_result()}, "t2"));
  std::ifstream in(tmpl);
  std::stringstream ss;
  ss << in.rdbuf();
  const auto lines = lines_of(ss.str());
  ::unlink(tmpl);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0], vb::csv_header());
  EXPECT_EQ(lines[1].rfind("t1,", 0), 0u);
  EXPECT_EQ(lines[3].rfind("t2,", 0), 0u);
}

TEST(Csv, AppendToUnwritablePathFails) {
  EXPECT_FALSE(vb::append_csv("/nonexistent-dir/x.csv", {loop_result()}, "t"));
}

TEST(Table, OneAlignedLinePerResult) {
  vb::RunResult lat = loop_result();
  lat.mode = vb::Mode::latency;
  lat.p50_us = 21.25;
  lat.p99_us = 80.5;
  lat.p999_us = 1234.5;
  const auto lines = lines_of(vb::format_table({loop_result(), lat}));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0].size(), lines[1].size());
  EXPECT_EQ(lines[1].size(), lines[2].size());
  EXPECT_NE(lines[0].find("p99.9 us"), std::string::npos);
  EXPECT_NE(lines[1].find("2.000"), std::string::npos);  // rx Mpps
  EXPECT_NE(lines[2].find("1234.50"), std::string::npos);
  EXPECT_NE(lines[1].find(" -"), std::string::npos);  // no latency for loop
  EXPECT_NE(lines[0].find("  ring in-order "), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("  split       no "), std::string::npos) << lines[1];
}

TEST(Json, LatencyFieldsOnlyForLatency) {
  const auto j = vb::to_json(loop_result());
  EXPECT_EQ(j["mode"], "loop");
  EXPECT_EQ(j["drops"], 10);
  EXPECT_DOUBLE_EQ(j["mpps"].get<double>(), 2.0);
  EXPECT_FALSE(j.contains("p50_us"));
  EXPECT_EQ(j["ring"], "split");
  EXPECT_EQ(j["in_order"], false);
  vb::RunResult lat = loop_result();
  lat.mode = vb::Mode::latency;
  lat.p99_us = 7.0;
  EXPECT_DOUBLE_EQ(vb::to_json(lat)["p99_us"].get<double>(), 7.0);
}

TEST(Live, LineShowsRatesAndDrops) {
  const std::string l = vb::format_live(3.0, 4.5e6, 4.25e6, 64, 17);
  EXPECT_NE(l.find("4.500 Mpps"), std::string::npos) << l;
  EXPECT_NE(l.find("4.250 Mpps"), std::string::npos) << l;
  EXPECT_NE(l.find("2.304 Gbit/s"), std::string::npos) << l;
  EXPECT_NE(l.find("drops 17"), std::string::npos) << l;
}

TEST(Frame, RoundTripsSeqAndTime) {
  std::array<std::uint8_t, 2036> buf{};
  EXPECT_EQ(vb::write_frame(buf, 64, 42, 123456789), 64u);
  std::uint64_t seq = 0, t = 0;
  ASSERT_TRUE(vb::read_frame(std::span(buf.data(), 64), seq, t));
  EXPECT_EQ(seq, 42u);
  EXPECT_EQ(t, 123456789u);
  EXPECT_EQ(buf[12], 0x88);
  EXPECT_EQ(buf[13], 0xb5);
}

TEST(Frame, ShortOrForeignFramesAreNotOurs) {
  std::array<std::uint8_t, 128> buf{};
  std::uint64_t seq = 0, t = 0;
  EXPECT_FALSE(vb::read_frame(buf, seq, t));  // no magic
  vb::write_frame(buf, 64, 1, 2);
  EXPECT_FALSE(vb::read_frame(std::span(buf.data(), 20), seq, t));  // truncated
}

TEST(Frame, TooSmallIsPaddedTooLargeIsRefused) {
  std::array<std::uint8_t, 100> buf{};
  EXPECT_EQ(vb::write_frame(buf, 10, 0, 0), vb::kMinFrame);
  EXPECT_GT(vb::write_frame(buf, 200, 0, 0), buf.size());
}

// ---- blk mode ----

namespace {

vb::BlkResult blk_result() {
  vb::BlkResult r;
  r.label = "vhostkit-busy";
  r.rw = vb::BlkRw::randwrite;
  r.bs = 4096;
  r.iodepth = 32;
  r.queues = 1;
  r.poll = "busy";
  r.ring = "packed";
  r.in_order = true;
  r.seconds = 2.0;
  r.requests = 500000;
  r.total = 600000;
  r.errors = 3;
  r.iops = 250000;
  r.samples = 500000;
  r.p50_us = 12.5;
  r.p99_us = 40.25;
  r.p999_us = 90.125;
  r.min_us = 3;
  r.max_us = 400;
  r.mean_us = 14;
  return r;
}

}  // namespace

TEST(ParseMode, BlkIsAModeButNotANetMode) {
  EXPECT_EQ(vb::parse_mode("blk").value(), vb::Mode::blk);
  EXPECT_FALSE(vb::is_net(vb::Mode::blk));
  EXPECT_TRUE(vb::is_net(vb::Mode::loop));
  EXPECT_NE(vb::parse_mode("disk").error().message().find("blk"), std::string::npos);
}

TEST(ParseMode, FwdIsANetModeThatReflects) {
  EXPECT_EQ(vb::parse_mode("fwd").value(), vb::Mode::fwd);
  EXPECT_EQ(vb::to_string(vb::Mode::fwd), "fwd");
  EXPECT_TRUE(vb::is_net(vb::Mode::fwd));
  EXPECT_TRUE(vb::reflects(vb::Mode::fwd));
  EXPECT_TRUE(vb::reflects(vb::Mode::loop));
  EXPECT_FALSE(vb::reflects(vb::Mode::txonly));
  EXPECT_FALSE(vb::reflects(vb::Mode::rxonly));
  EXPECT_NE(vb::parse_mode("io").error().message().find("fwd"), std::string::npos);
}

TEST(BlkArgs, RwParses) {
  EXPECT_EQ(vb::parse_rw("randread").value(), vb::BlkRw::randread);
  EXPECT_EQ(vb::parse_rw("randwrite").value(), vb::BlkRw::randwrite);
  EXPECT_FALSE(vb::parse_rw("read"));
  EXPECT_FALSE(vb::parse_rw(""));
  EXPECT_NE(vb::parse_rw("rw").error().message().find("--rw"), std::string::npos);
}

TEST(BlkArgs, BsMustBeWholeSectorsInRange) {
  EXPECT_TRUE(vb::check_bs(512, 1u << 20));
  EXPECT_TRUE(vb::check_bs(4096, 1u << 20));
  EXPECT_TRUE(vb::check_bs(1u << 20, 1u << 20));
  EXPECT_FALSE(vb::check_bs(0, 1u << 20));
  EXPECT_FALSE(vb::check_bs(256, 1u << 20));
  EXPECT_FALSE(vb::check_bs(4000, 1u << 20));
  EXPECT_FALSE(vb::check_bs((1u << 20) + 512, 1u << 20));
}

TEST(BlkArgs, OptionsOfTheOtherModeFamilyAreRefused) {
  EXPECT_TRUE(vb::check_mode_options(vb::Mode::blk, {"--rw", "--iodepth", "--bs"}));
  EXPECT_TRUE(vb::check_mode_options(vb::Mode::loop, {"--size", "--burst"}));
  EXPECT_TRUE(vb::check_mode_options(vb::Mode::blk, {}));
  for (const char* o : {"--size", "--burst", "--buffer-size", "--reply-timeout"}) {
    auto r = vb::check_mode_options(vb::Mode::blk, {"--bs", o});
    ASSERT_FALSE(r) << o;
    EXPECT_NE(r.error().message().find(o), std::string::npos) << r.error().message();
    EXPECT_EQ(r.error().message().find('\n'), std::string::npos);
  }
  for (const char* o : {"--rw", "--iodepth", "--bs"}) {
    for (vb::Mode m :
         {vb::Mode::txonly, vb::Mode::rxonly, vb::Mode::loop, vb::Mode::fwd, vb::Mode::latency}) {
      auto r = vb::check_mode_options(m, {o});
      ASSERT_FALSE(r) << o;
      EXPECT_NE(r.error().message().find(o), std::string::npos) << r.error().message();
    }
  }
}

TEST(BlkCsv, RowHasAColumnPerHeaderField) {
  const auto count = [](const std::string& s) { return std::count(s.begin(), s.end(), ','); };
  const std::string row = vb::blk_csv_row(blk_result(), "2024-01-01T00:00:00Z");
  EXPECT_EQ(count(row), count(vb::blk_csv_header()));
  EXPECT_EQ(row,
            "2024-01-01T00:00:00Z,vhostkit-busy,blk,randwrite,4096,32,1,busy,2.000,250000,1024.00,"
            "500000,600000,3,500000,12.500,40.250,90.125,3.000,400.000,14.000,packed,1");
}

TEST(BlkCsv, AppendWritesHeaderOnlyOnce) {
  char path[] = "/tmp/vk-blk-csv-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::close(fd);
  ASSERT_TRUE(vb::append_blk_csv(path, {blk_result()}, "t1"));
  ASSERT_TRUE(vb::append_blk_csv(path, {blk_result(), blk_result()}, "t2"));
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  ::unlink(path);
  const auto lines = lines_of(ss.str());
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0], vb::blk_csv_header());
  EXPECT_EQ(lines[1].rfind("t1,", 0), 0u);
  EXPECT_EQ(lines[3].rfind("t2,", 0), 0u);
}

TEST(BlkJson, CarriesRatesLatencyAndErrors) {
  const auto j = vb::to_json(blk_result());
  EXPECT_EQ(j["mode"], "blk");
  EXPECT_EQ(j["rw"], "randwrite");
  EXPECT_EQ(j["iops"], 250000.0);
  EXPECT_DOUBLE_EQ(j["mb_per_s"].get<double>(), 1024.0);
  EXPECT_EQ(j["errors"], 3u);
  EXPECT_EQ(j["iodepth"], 32u);
  EXPECT_DOUBLE_EQ(j["p999_us"].get<double>(), 90.125);
  EXPECT_EQ(j["ring"], "packed");
  EXPECT_EQ(j["in_order"], true);
}

TEST(BlkTable, OneAlignedLinePerResult) {
  auto a = blk_result();
  auto b = blk_result();
  b.rw = vb::BlkRw::randread;
  b.iops = 1234567;
  b.errors = 0;
  const auto lines = lines_of(vb::format_blk_table({a, b}));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0].size(), lines[1].size());
  EXPECT_EQ(lines[1].size(), lines[2].size());
  EXPECT_NE(lines[0].find("IOPS"), std::string::npos);
  EXPECT_NE(lines[0].find("p99.9 us"), std::string::npos);
  EXPECT_NE(lines[1].find("randwrite"), std::string::npos);
  EXPECT_NE(lines[1].find("1024.0"), std::string::npos);  // MB/s
  EXPECT_NE(lines[1].find(" packed      yes "), std::string::npos) << lines[1];
  EXPECT_NE(lines[1].find("40.25"), std::string::npos);
  EXPECT_NE(lines[2].find("1234567"), std::string::npos);
}

TEST(BlkLive, LineShowsIopsMbAndErrors) {
  const std::string l = vb::format_blk_live(3.0, 200000, 4096, 7);
  EXPECT_NE(l.find("200000 IOPS"), std::string::npos) << l;
  EXPECT_NE(l.find("819.2 MB/s"), std::string::npos) << l;
  EXPECT_NE(l.find("errors 7"), std::string::npos) << l;
}
