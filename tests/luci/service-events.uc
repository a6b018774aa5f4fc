// Stand-in for procd's ubus object `service` in the LuCI rig, which has no procd: records
// each `service event` as one JSON line in /tmp/service-events.log. When LuCI applies a
// config, rpcd sends `config.change` with the package's name there, and on a router procd
// then reloads the services whose config trigger names that package.
'use strict';

import { connect } from 'ubus';
import { init, run } from 'uloop';
import { open } from 'fs';

init();

const bus = connect();
const published = bus?.publish('service', {
	event: {
		args: { type: '', data: {} },
		call: function(req) {
			const log = open('/tmp/service-events.log', 'a');

			log.write(sprintf('%J\n', req.args));
			log.close();

			return 0;
		}
	}
});

if (!published)
	die(`cannot publish the service object: ${bus ? 'ubus refused' : 'no ubus'}`);

run();
