// The preParsing backstop, on its own: a request that reaches body parsing without a decision.
import t from 'tap'
import { consulNativeBackstop } from '../lib/enforcement'

t.test('a request without a recorded decision is denied and logged; one with a decision passes', async (t) => {
  const logged: unknown[] = []
  const request = { consulDecision: null, method: 'GET', url: '/x', log: { error: (obj: unknown) => logged.push(obj) } }
  let outcome: [Error | null, unknown] | undefined
  consulNativeBackstop(request as never, null, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED', statusCode: 403 })
  t.match(logged, [{ consulNative: { event: 'no-decision', method: 'GET', path: '/x' } }])

  const decided = { ...request, consulDecision: { allow: true, reason: 'x' } }
  consulNativeBackstop(decided as never, null, 'payload', (err, payload) => { outcome = [err, payload] })
  t.same(outcome, [null, 'payload'])
})
