// Small pieces of Go's standard library behaviour the dev agent must reproduce exactly, shared by
// the modules that parse what Consul parses with Go.

/** Nanoseconds per unit of a Go duration string (time.ParseDuration). */
export const DURATION_UNIT_NS: Readonly<Record<string, bigint>> = {
  ns: 1n,
  us: 1_000n,
  µs: 1_000n, // U+00B5
  μs: 1_000n, // U+03BC
  ms: 1_000_000n,
  s: 1_000_000_000n,
  m: 60_000_000_000n,
  h: 3_600_000_000_000n
}

/** Go's url.PathUnescape on well-formed input: escapes become raw bytes, whatever their UTF-8 validity. */
export function pathUnescape (text: string): string {
  const src = Buffer.from(text)
  const out: number[] = []
  for (let i = 0; i < src.length; i++) {
    if (src[i] === 0x25) {
      out.push(Number.parseInt(src.subarray(i + 1, i + 3).toString(), 16))
      i += 2
    } else {
      out.push(src[i] as number)
    }
  }
  return Buffer.from(out).toString()
}
