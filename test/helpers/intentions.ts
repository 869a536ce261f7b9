// Intentions for tests, as the match endpoint returns them.
import type { Intention, IntentionPermission } from '../../lib/agent/wire'

/** `src → dst` with its precedence; an array of permissions makes it L7. */
export function ixn (src: string, dst: string, precedence: number, what: 'allow' | 'deny' | IntentionPermission[], extra: Partial<Intention> = {}): Intention {
  const [name, ns = 'default'] = src.split('/').reverse()
  return {
    SourceNS: ns,
    SourceName: name,
    DestinationNS: 'default',
    DestinationName: dst,
    SourceType: 'consul',
    ...(typeof what === 'string' ? { Action: what } : { Permissions: what }),
    Precedence: precedence,
    CreateIndex: 1,
    ModifyIndex: 1,
    ...extra
  }
}
