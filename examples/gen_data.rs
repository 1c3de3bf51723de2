//! Generates realistic, deterministic test data: ICCID lists and ThingSpace usage callbacks.
//!
//! Run:
//!   cargo run --release --example gen_data -- iccids 1000 > data/iccids.csv
//!   cargo run --release --example gen_data -- callbacks DIR --callbacks 10000 --records 100 [--ndjson] [--date 2021-08-15]
//!       [--days K] [--first-request R]
//!
//! `callbacks` writes N usage callbacks of M records each plus one completion callback per request:
//! as N*2 files (`--files`, the default) or as one `callbacks.ndjson` (`--ndjson`). Usage values are a
//! pure function of (ICCID, window), so a test can check every row.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

/// A deterministic 64-bit mix (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The i-th ICCID: Verizon-like `891480…`, 20 digits (every 7th one 19), valid Luhn; distinct for
/// every i below 10^8 (the serial is a bijection of i modulo 10^8).
fn iccid(i: u64) -> String {
    let serial = (i * 48_271 + 12_345) % 100_000_000;
    let body = if i % 7 == 3 {
        format!("891480000{serial:08}0")[..18].to_string()
    } else {
        format!("8914800000{serial:08}0")[..19].to_string()
    };
    format!(
        "{body}{}",
        tsusage::ingest::luhn_check_digit(body.as_bytes())
    )
}

/// Usage of one ICCID over one window, as the simulator would report it.
fn usage(iccid: &str, day: u32) -> (u64, u64, u64) {
    let h = mix(iccid
        .bytes()
        .fold(u64::from(day), |acc, b| mix(acc ^ u64::from(b))));
    let data = h % 50_000_000;
    let mo = (h >> 40) % 20;
    let mt = (h >> 50) % 30;
    (data, mo, mt)
}

fn request_id(n: u64) -> String {
    let a = mix(n);
    let b = mix(a);
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b & 0xfff,
        b >> 16 & 0xffff_ffff_ffff
    )
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn date_text(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T00:00:00.0000000")
}

fn usage_callback(req: &str, iccids: &[String], day: i64) -> String {
    let mut records = String::new();
    for (i, id) in iccids.iter().enumerate() {
        let (data, mo, mt) = usage(id, day as u32);
        if i > 0 {
            records.push(',');
        }
        write!(
            records,
            r#"{{"deviceIdentifierCollection":[{{"id":"{id}","kind":"ICCID"}}],"dataUsage":"{data}","smsUsage":"{}","moSms":"{mo}","mtSms":"{mt}","startDate":"{}","endDate":"{}"}}"#,
            mo + mt,
            date_text(day),
            date_text(day + 1)
        )
        .ok();
    }
    format!(
        r#"{{"username":"tsusage","password":"sample-secret","requestId":"{req}","deviceResponse":{{"devicePromoUsageResponse":[{records}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#
    )
}

fn completion_callback(req: &str) -> String {
    format!(
        r#"{{"username":"tsusage","password":"sample-secret","requestId":"{req}","deviceResponse":{{}},"comment":"Request Completed Processing","callbackCount":1,"maxCallbackThreshold":4}}"#
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    match args.first().map(String::as_str) {
        Some("iccids") => {
            let n: u64 = args.get(1).ok_or("iccids N")?.parse()?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            writeln!(out, "iccid")?;
            for i in 0..n {
                writeln!(out, "{}", iccid(i))?;
            }
        }
        Some("callbacks") => {
            let dir = PathBuf::from(args.get(1).ok_or("callbacks DIR")?);
            let callbacks: u64 = value("--callbacks").map_or(Ok(10), |v| v.parse())?;
            let records: u64 = value("--records").map_or(Ok(100), |v| v.parse())?;
            let date = value("--date").unwrap_or_else(|| "2021-08-15".into());
            let days: u64 = value("--days").map_or(Ok(1), |v| v.parse())?;
            let ndjson = args.iter().any(|a| a == "--ndjson");
            let first_request: u64 = value("--first-request").map_or(Ok(0), |v| v.parse())?;
            let parts: Vec<u32> = date.split('-').map(str::parse).collect::<Result<_, _>>()?;
            let [y, m, d] = parts[..] else { return Err("--date YYYY-MM-DD".into()) };
            let first_day = days_from_civil(i64::from(y), m, d);
            std::fs::create_dir_all(&dir)?;
            let mut lines = ndjson.then(|| -> std::io::Result<_> {
                Ok(std::io::BufWriter::new(std::fs::File::create(dir.join("callbacks.ndjson"))?))
            }).transpose()?;
            for n in 0..callbacks {
                let day = first_day + (n % days) as i64;
                let start = (n / days) * records;
                let ids: Vec<String> = (start..start + records).map(iccid).collect();
                let req = request_id(first_request + n);
                let bodies = [usage_callback(&req, &ids, day), completion_callback(&req)];
                match &mut lines {
                    Some(out) => {
                        for body in bodies {
                            writeln!(out, "{body}")?;
                        }
                    }
                    None => {
                        std::fs::write(dir.join(format!("usage-{n:06}.json")), &bodies[0])?;
                        std::fs::write(dir.join(format!("done-{n:06}.json")), &bodies[1])?;
                    }
                }
            }
            if let Some(mut out) = lines {
                out.flush()?;
            }
        }
        _ => return Err("usage: gen_data iccids N | gen_data callbacks DIR [--callbacks N] [--records M] [--date D] [--days K] [--first-request R] [--ndjson]".into()),
    }
    Ok(())
}
