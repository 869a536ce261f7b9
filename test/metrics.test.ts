// The text exposition format and the families before any leaf is known.
import t from 'tap'
import { metricFamilies, prometheusText } from '../lib/metrics'

t.test('families before the first sync, and label escaping in the text format', async (t) => {
  const counters = { allowed: 0, denied: 0, unauthenticated: 0, rejected: 0, exempt: 0, shadowDenied: 0, shadowUnauthenticated: 0 }
  const status = { ready: false, leaf: null } as never
  const families = metricFamilies(counters, { 'a"b\\c\nd': 3 }, status, 0)
  t.same(families.find((family) => family.name === 'consul_native_leaf_expiry_seconds')?.values, [], 'no leaf, no expiry sample')
  t.match(prometheusText(families), 'consul_native_sync_failures_total{watch="a\\"b\\\\c\\nd"} 3\n')
  t.match(prometheusText(families), 'consul_native_ready 0\n')
})
